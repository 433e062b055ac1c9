"""Distillation objectives, one module each, chosen by `distill.objective` (params in `distill.<name>`).

| name          | class         | paper                                                        |
|---------------|---------------|--------------------------------------------------------------|
| `dmd2`        | `DMD2`        | Yin et al. 2024, Improved Distribution Matching Distillation |
| `dmd`         | `DMD`         | Yin et al. 2023, One-step Diffusion with DMD                 |
| `sid`         | `SiD`         | Zhou et al. 2024, Score identity Distillation                |
| `consistency` | `Consistency` | Song et al. 2023 / LCM / iCT, consistency distillation       |

Every objective takes a `Setup` and implements `generator_loss()` and `critic_loss()` (each returns
{"loss": total, ...parts to log}) plus `critic_updates`; fewstep.core.training.train runs them.
"""
from __future__ import annotations

from fewstep.core.objectives.base import Objective, Setup
from fewstep.core.objectives.consistency import Consistency
from fewstep.core.objectives.dmd import DMD
from fewstep.core.objectives.dmd2 import DMD2
from fewstep.core.objectives.sid import SiD

OBJECTIVES: dict[str, type[Objective]] = {"dmd2": DMD2, "dmd": DMD, "sid": SiD, "consistency": Consistency}


def build(name: str, setup: Setup) -> Objective:
    if name not in OBJECTIVES:
        raise ValueError(f"distill.objective must be one of {sorted(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name](setup)
