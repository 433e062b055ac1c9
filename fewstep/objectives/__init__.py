"""Distillation objectives, one module each, chosen by `distill.objective`.

| name   | class        | paper                                   |
|--------|--------------|-----------------------------------------|
| dmd2   | `DMD2`       | Yin et al. 2024, Improved DMD (DMD2)    |

Every objective takes a `Setup` and exposes two loss closures — `generator_loss()` and `critic_loss()` —
each returning {"loss": total, ...parts to log}. The trainer (fewstep.training.train) runs them.
"""
from __future__ import annotations

from .base import Objective, Setup
from .dmd2 import DMD2

OBJECTIVES: dict[str, type[Objective]] = {"dmd2": DMD2}


def build(name: str, setup: Setup) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"distill.objective must be one of {sorted(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name](setup)
