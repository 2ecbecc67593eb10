"""PaLM + RLHF in pure PyTorch: no I/O, no orchestration, importable and testable alone."""

from models.actor_critic import ActorCritic, Experience
from models.palm import PaLM, PaLMConfig
from models.ppo import KLController, PPOConfig
from models.reward import RewardModel, RewardModelConfig, pairwise_loss
from models.rlhf import RLHFTrainer, select_best_of_n
from models.sampling import Generation

__all__ = ["PaLM", "PaLMConfig", "RewardModel", "RewardModelConfig", "RLHFTrainer", "ActorCritic", "Experience",
           "PPOConfig", "KLController", "Generation", "pairwise_loss", "select_best_of_n"]
