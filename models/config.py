"""Bounded settings for the configs beside the models (PaLMConfig, RewardModelConfig, PPOConfig).

A bound is written once, in the field's type (``Annotated[int, Gt(0)]``, from the small ``annotated_types`` package):
pydantic reads it when a config arrives through the pipeline's settings, and `check_bounds` enforces the same bound
when a config is built in plain Python.
"""

from __future__ import annotations

import typing
from dataclasses import fields
from typing import Annotated

from annotated_types import Ge, Gt, GroupedMetadata, Interval, Le, Lt

Positive = Annotated[int, Gt(0)]
Count = Annotated[int, Ge(0)]
PositiveFloat = Annotated[float, Gt(0)]
NonNegative = Annotated[float, Ge(0)]
UnitInterval = Annotated[float, Interval(ge=0, le=1)]

_CHECKS = {Gt: (lambda v, b: v > b.gt, "greater than {0.gt}"), Ge: (lambda v, b: v >= b.ge, "at least {0.ge}"),
           Lt: (lambda v, b: v < b.lt, "less than {0.lt}"), Le: (lambda v, b: v <= b.le, "at most {0.le}")}


def check_bounds(config) -> None:
    """Raise ValueError naming the first field of a config dataclass whose value is outside its declared bound."""
    hints = typing.get_type_hints(type(config), include_extras=True)
    for f in fields(config):
        value = getattr(config, f.name)
        for item in getattr(hints[f.name], "__metadata__", ()):
            for bound in item if isinstance(item, GroupedMetadata) else (item,):
                check, wanted = _CHECKS.get(type(bound), (None, ""))
                if check is not None and not check(value, bound):
                    raise ValueError(f"{type(config).__name__} {f.name} must be {wanted.format(bound)}, got {value!r}")
