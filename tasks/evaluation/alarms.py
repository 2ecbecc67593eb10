"""Reward hacking, collapse and runaway KL, told from the numbers of a policy measured on held-out prompts.

Each check looks at one policy against the pretrained one (at the evaluation's temperature), or along the PPO run (its
checkpoints, in order), and says in one line what it saw and from which step and KL it started. They fire whatever the
oracle says, since a rater can be gamed too: a collapsed policy that an oracle loves is still flagged.

- collapse: distinct-2 below `diversity` x the pretrained policy's, or entropy per token below `entropy` x its, or
  one answer making up more than `same_answer` of all answers (one answer for many prompts);
- runaway: KL per answer above `kl_factor` x the PPO run's KL budget, or the reward model's score more than
  `reward_sd` of its training responses' standard deviations above their mean (off the ground it was fitted on);
- hacking (needs an oracle): along the run, the reward-model score keeps rising while the oracle falls more than
  `oracle_drop` of the rating scale below its best.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Point:
    """One policy measured on the held-out prompts."""

    label: str
    step: int | None  # the PPO step of a checkpoint; None for a baseline
    kl: float  # nats per answer, to the reference
    reward: float  # mean reward-model score
    standardised: float  # the same in standard deviations of the reward model's training responses
    oracle: float | None
    distinct_2: float
    entropy: float  # nats per token
    same_answer: float  # top_answer_share


@dataclass
class Limits:
    diversity: float = 0.5
    entropy: float = 0.25
    same_answer: float = 0.25
    kl_budget: float | None = None  # nats per answer; None: no runaway check on KL
    kl_factor: float = 2.0
    reward_sd: float | None = 4.0
    oracle_drop: float = 0.1  # of the rating scale's span
    scale_span: float = 4.0  # the oracle's highest minus lowest rating


@dataclass
class Alarm:
    kind: str  # collapse | runaway | hacking
    message: str
    step: int | None
    kl: float


def collapse(point: Point, base: Point, limits: Limits) -> str | None:
    if point.distinct_2 < limits.diversity * base.distinct_2:
        return (f"distinct-2 fell to {point.distinct_2:.2f} from the pretrained policy's {base.distinct_2:.2f} "
                f"(floor {limits.diversity:g}x)")
    if point.entropy < limits.entropy * base.entropy:
        return (f"entropy fell to {point.entropy:.3f} nats per token from the pretrained policy's {base.entropy:.3f} "
                f"(floor {limits.entropy:g}x)")
    if point.same_answer > limits.same_answer:
        return f"one answer is {point.same_answer:.0%} of all answers, to every prompt (limit {limits.same_answer:.0%})"
    return None


def runaway(point: Point, limits: Limits) -> str | None:
    if limits.kl_budget is not None and point.kl > limits.kl_factor * limits.kl_budget:
        return (f"KL to the reference is {point.kl:.2f} nats per answer, past {limits.kl_factor:g}x the budget of "
                f"{limits.kl_budget:g}")
    if limits.reward_sd is not None and point.standardised > limits.reward_sd:
        return (f"the reward model's score is {point.standardised:.1f} standard deviations above its training "
                f"responses' mean, past {limits.reward_sd:g}: off the ground it was fitted on")
    return None


def hacking(run: list[Point], limits: Limits) -> tuple[Point, str] | None:
    """The first point of the run (in order) where the reward model's score is above its value at the oracle's best,
    and the oracle below that best by more than the allowed drop."""
    rated = [p for p in run if p.oracle is not None]
    for i, point in enumerate(rated):
        best = max(rated[:i + 1], key=lambda p: p.oracle)
        drop = best.oracle - point.oracle
        if drop > limits.oracle_drop * limits.scale_span and point.reward > best.reward:
            return point, (f"the reward model's score rose ({best.reward:.3f} -> {point.reward:.3f}) while the oracle "
                           f"fell {drop:.2f} from its best ({best.oracle:.2f} at {_where(best)})")
    return None


def first_alarm(run: list[Point], base: Point, limits: Limits) -> Alarm | None:
    """The earliest alarm along `run` (the PPO checkpoints in order, the evaluated policy last)."""
    found = hacking(run, limits)
    for point in run:
        if found is not None and found[0] is point:
            return Alarm("hacking", f"reward hacking from {_where(point)}: {found[1]}", point.step, point.kl)
        for kind, reason in (("collapse", collapse(point, base, limits)), ("runaway", runaway(point, limits))):
            if reason is not None:
                return Alarm(kind, f"{kind} from {_where(point)}: {reason}", point.step, point.kl)
    return None


def _where(point: Point) -> str:
    step = f"step {point.step}" if point.step is not None else point.label
    return f"{step} (KL {point.kl:.2f} nats per answer)"


class Watch:
    """The same signals along a PPO run, step by step, against the run's first step (rollouts of the policy it
    started from): a metric per step (`alarm`: 1 while any fires) and a warning in the log the first time each kind
    fires. Hacking needs an oracle, which PPO does not have: the evaluation looks for it."""

    def __init__(self, limits: Limits, log):
        self.limits, self.log, self.start, self.warned = limits, log, None, set()

    def check(self, step: int, kl: float, standardised: float, distinct_2: float, entropy: float,
              same_answer: float) -> dict[str, float]:
        if self.start is None:
            self.start = {"distinct_2": distinct_2, "entropy": entropy}
        base = Point("start", None, 0.0, 0.0, 0.0, None, self.start["distinct_2"], self.start["entropy"], 0.0)
        now = Point("step", step, kl, 0.0, standardised, None, distinct_2, entropy, same_answer)
        found = {"collapse": collapse(now, base, self.limits), "runaway": runaway(now, self.limits)}
        for kind, reason in found.items():
            if reason is not None and kind not in self.warned:
                self.warned.add(kind)
                self.log.warning("PPO step %d: %s: %s (the evaluation will say whether it lasted)", step, kind, reason)
        return {"alarm": float(any(r is not None for r in found.values()))}

    def state_dict(self) -> dict:
        return {"start": self.start, "warned": sorted(self.warned)}

    def load_state_dict(self, state: dict) -> None:
        self.start, self.warned = state.get("start"), set(state.get("warned", []))
