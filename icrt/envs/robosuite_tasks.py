"""Robosuite task names of the adapter: the standard tasks and the (object, bin) family.

Shared by the adapter (``icrt/envs/robosuite.py``) and the scripted experts
(``icrt/envs/experts/robosuite_experts.py``) without either importing the other; no simulator
import happens here.
"""

from __future__ import annotations

import re

from icrt.errors import UserError

BASE_TASKS: tuple[str, ...] = ("Lift", "Stack", "PickPlaceCan", "NutAssemblySquare")
FAMILY_OBJECTS: tuple[str, ...] = ("Milk", "Bread", "Cereal", "Can")
NUM_BINS = 4
_FAMILY_RE = re.compile(r"^PickPlace(Milk|Bread|Cereal|Can)ToBin([1-4])$")

# Episode limits: the scripted experts finish in well under these (see docs/robosuite.md), which
# leaves room for a learned policy's slower or corrective attempts.
DEFAULT_MAX_STEPS: dict[str, int] = {
    "Lift": 250,
    "Stack": 450,
    "PickPlaceCan": 450,
    "NutAssemblySquare": 550,
    "family": 450,
}


def robosuite_tasks() -> list[str]:
    """All task names this adapter knows: the four standard tasks, then the 16 family tasks."""
    family = [f"PickPlace{o}ToBin{k}" for o in FAMILY_OBJECTS for k in range(1, NUM_BINS + 1)]
    return [*BASE_TASKS, *family]


def parse_family_task(task: str) -> tuple[str, int] | None:
    """``"PickPlaceMilkToBin3"`` -> ``("Milk", 3)``; ``None`` for a task outside the family."""
    m = _FAMILY_RE.match(task)
    return (m.group(1), int(m.group(2))) if m else None


def check_task(task: str) -> None:
    if task not in BASE_TASKS and parse_family_task(task) is None:
        raise UserError(
            f"Unknown robosuite task '{task}'; choose one of {', '.join(BASE_TASKS)} or "
            "PickPlace{Milk,Bread,Cereal,Can}ToBin{1..4}."
        )


def default_max_steps(task: str) -> int:
    check_task(task)
    return DEFAULT_MAX_STEPS["family" if parse_family_task(task) else task]
