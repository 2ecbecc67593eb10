"""The champion gate: whether the evaluated policy becomes `champion`, decided on evidence and recorded with it.

A policy moves `champion` only when it beats both the current champion and the pretrained policy on the same
held-out prompts: the paired win rate's 95% interval lies above one half, on the oracle's ratings when there is an
oracle, else on the reward model's scores. A policy any alarm flagged (collapse, runaway KL, reward hacking) is never
promoted. The check and the move happen under one lease in the store, so two evaluations deciding at once cannot both
promote: the second sees the champion the first set, and keeps its own decision only if that champion is the one it
compared against. The decision and its evidence are tags on the policy's version (`promotion.*`) and a line in the
report.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tasks.runtime.lease import RunLease
from tasks.runtime.stage import CHAMPION
from tasks.storage.inputs import ModelInput
from tasks.storage.store import join_uri, store_root
from tasks.tracking import client as tracking
from tasks.tracking.registry import get_alias, set_alias

log = logging.getLogger(__name__)
THRESHOLD = 0.5  # the win rate's interval must lie above this


@dataclass
class Evidence:
    judge: str  # "oracle" or "reward model"
    vs_pretrained: tuple[float, float, float]  # win rate, low, high
    vs_champion: tuple[float, float, float] | None  # None: there is no champion to beat
    champion_version: str | None
    alarm: str | None  # the alarm's line, when one fired

    def reasons(self) -> list[str]:
        """Why the policy may not be promoted; [] when it may."""
        found = []
        if self.alarm:
            found.append(f"flagged: {self.alarm}")
        for what, (rate, low, _) in (("the pretrained policy", self.vs_pretrained),
                                     *((("champion v" + str(self.champion_version), self.vs_champion),)
                                       if self.vs_champion is not None else ())):
            if not low > THRESHOLD:
                found.append(f"does not beat {what} on the {self.judge}: win rate {rate:.3f}, 95% interval low "
                             f"{low:.3f} <= {THRESHOLD}")
        return found


@dataclass
class Decision:
    promoted: bool
    line: str  # for the report
    tags: dict[str, str] = field(default_factory=dict)


def decide(policy: ModelInput, evidence: Evidence, models: list[ModelInput]) -> Decision:
    """Check and move `champion` under the promotion lease; tag the policy's version with the decision. `models`:
    the registered models the policy was made from, which become champion with it."""
    with RunLease(join_uri(store_root(), "promotion"), "eval", waiting="is deciding a promotion"):
        current = get_alias(policy.name, CHAMPION) if policy.name else None
        reasons = evidence.reasons()
        if current != evidence.champion_version and current != policy.version:
            reasons.append(f"champion moved to v{current} while this policy was being evaluated against "
                           f"{'v' + evidence.champion_version if evidence.champion_version else 'no champion'}: "
                           "evaluate it again to compare")
        promoted = not reasons and policy.name is not None
        if promoted:
            for model in models:
                if model.name is not None:
                    set_alias(model.name, CHAMPION, model.version)
    decision = _record(policy, evidence, promoted, reasons, current)
    log.info("%s", decision.line)
    return decision


def _record(policy: ModelInput, evidence: Evidence, promoted: bool, reasons: list[str],
            current: str | None) -> Decision:
    rate, low, high = evidence.vs_pretrained
    tags = {"promotion.decision": "promoted" if promoted else "kept", "promotion.judge": evidence.judge,
            "promotion.win_rate_vs_pretrained": f"{rate:.4f}",
            "promotion.interval_vs_pretrained": f"[{low:.4f}, {high:.4f}]"}
    if evidence.vs_champion is not None:
        c_rate, c_low, c_high = evidence.vs_champion
        tags.update({"promotion.champion_compared": str(evidence.champion_version),
                     "promotion.win_rate_vs_champion": f"{c_rate:.4f}",
                     "promotion.interval_vs_champion": f"[{c_low:.4f}, {c_high:.4f}]"})
    if promoted:
        tags["promotion.replaced"] = str(current) if current else "none"
        line = (f"promoted to champion{f' (replacing v{current})' if current else ''}: win rate {rate:.3f} "
                f"[{low:.3f}, {high:.3f}] against the pretrained policy on the {evidence.judge}"
                + (f", {evidence.vs_champion[0]:.3f} [{evidence.vs_champion[1]:.3f}, {evidence.vs_champion[2]:.3f}] "
                   f"against v{evidence.champion_version}" if evidence.vs_champion is not None else ""))
    elif policy.name is None:
        line = "not a registered version: nothing to promote"
    else:
        tags["promotion.reason"] = "; ".join(reasons)[:5000]
        line = f"kept the champion ({'v' + current if current else 'none'}): " + "; ".join(reasons)
    if policy.name is not None:
        client = tracking.get_client()
        for key, value in tags.items():
            client.set_model_version_tag(policy.name, policy.version, key, value)
    return Decision(promoted, line, tags)
