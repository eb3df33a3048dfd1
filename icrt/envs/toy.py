"""A point mass reaching a goal in the plane: a simulator small enough for unit tests of the
learning loops (collection, training, PPO, DAgger) that run in seconds, and for trying flags.

Observation keys: ``state`` (4,) float32 = position and goal; ``proprio`` (2,) = position.
Actions (2,) in [-1, 1] move the point by ``0.1 * action``. Reward: minus the distance to the
goal after the step. Success: within 0.1 of the goal. Episodes last 30 steps by default; the
expert moves straight to the goal at full speed (at most ~29 steps from any layout).
"""

from __future__ import annotations

import numpy as np

from icrt.envs.base import check_env_args
from icrt.errors import UserError

TASKS = ("point-reach",)
STEP = 0.1
RADIUS = 0.1


def toy_tasks() -> list[str]:
    return list(TASKS)


class PointReachEnv:
    def __init__(self, task: str, *, image_size: int = 0, cameras: tuple[str, ...] = (),
                 max_steps: int | None = None) -> None:
        if task not in TASKS:
            raise UserError(f"Unknown toy task '{task}'; the toy simulator has {TASKS[0]}.")
        if cameras:
            raise UserError("The toy simulator has no cameras.")
        check_env_args(image_size, cameras, max_steps)
        self.task = task
        self.max_steps = int(max_steps or 30)
        self.action_dim = 2
        self.fps = 10.0
        self._pos = np.zeros(2)
        self._goal = np.zeros(2)

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(int(seed))
        self._pos = rng.uniform(-1, 1, 2)
        self._goal = rng.uniform(-1, 1, 2)
        return self._observe()

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, dict]:
        action = np.clip(np.asarray(action, np.float64).reshape(-1), -1.0, 1.0)
        if action.shape != (2,):
            raise ValueError(f"Toy actions have 2 entries, got {action.shape}")
        self._pos = self._pos + STEP * action
        dist = float(np.linalg.norm(self._pos - self._goal))
        return self._observe(), -dist, False, {"success": dist < RADIUS}

    def render(self) -> np.ndarray:
        frame = np.full((64, 64, 3), 255, np.uint8)
        for p, color in ((self._goal, (0, 160, 0)), (self._pos, (200, 0, 0))):
            x, y = np.clip(((p + 1.5) / 3 * 63).astype(int), 1, 62)
            frame[63 - y - 1:63 - y + 2, x - 1:x + 2] = color
        return frame

    def obs_meta(self) -> dict[str, dict]:
        return {}

    def close(self) -> None:
        pass

    def _observe(self) -> dict[str, np.ndarray]:
        state = np.concatenate([self._pos, self._goal]).astype(np.float32)
        return {"state": state, "proprio": self._pos.astype(np.float32)}


class PointReachExpert:
    """Straight to the goal at full speed."""

    def reset(self, env: PointReachEnv) -> None:
        pass

    def act(self, env: PointReachEnv, obs: dict[str, np.ndarray]) -> np.ndarray:
        delta = (obs["state"][2:] - obs["state"][:2]) / STEP
        return np.clip(delta, -1.0, 1.0).astype(np.float32)


def make_toy_env(task: str, *, image_size: int = 0, cameras: tuple[str, ...] = (),
                 max_steps: int | None = None) -> PointReachEnv:
    return PointReachEnv(task, image_size=image_size, cameras=cameras, max_steps=max_steps)


def make_toy_expert(task: str) -> PointReachExpert:
    if task not in TASKS:
        raise UserError(f"Unknown toy task '{task}'; the toy simulator has {TASKS[0]}.")
    return PointReachExpert()
