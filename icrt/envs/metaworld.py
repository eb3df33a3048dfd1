"""Meta-World (v3) adapter: all 50 tasks, seeded episodes, the simulator's own success flag.

Observation keys:
  ``state``           (39,) float32  Meta-World's observation with the goal visible (as in MT10)
  ``proprio``         (4,)  float32  hand position and gripper opening
  ``image_<camera>``  (S, S, 3) uint8 for each requested camera (corner, corner2, corner3,
                                      topview, behindGripper, gripperPOV)

Object and goal positions are drawn from the task's own randomisation space with the episode
seed, so ``reset(seed)`` is reproducible and different seeds give different layouts. Actions are
Meta-World's 4-D deltas (xyz of the hand, gripper), in [-1, 1].
"""

from __future__ import annotations

import pickle
from typing import Any

import numpy as np

from icrt.envs.base import check_env_args, make_renderer
from icrt.errors import UserError

CAMERAS = ("corner", "corner2", "corner3", "topview", "behindGripper", "gripperPOV")
DEFAULT_MAX_STEPS = 500  # Meta-World's max_path_length
FPS = 80.0  # 1 / (frame_skip 5 * timestep 0.0025)


def metaworld_tasks() -> list[str]:
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS

    return sorted(ALL_V3_ENVIRONMENTS)


def _disable_costly_rendering(model: Any) -> None:
    """Shadows and reflections dominate software-rendering time and teach the policy nothing."""
    model.light_castshadow[:] = 0
    model.mat_reflectance[:] = 0
    model.vis.quality.shadowsize = 0


class MetaWorldEnv:
    """One Meta-World task; reused across seeded episodes."""

    def __init__(
        self,
        task: str,
        *,
        image_size: int = 0,
        cameras: tuple[str, ...] = (),
        max_steps: int | None = None,
        render_size: int = 256,
    ) -> None:
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS, ML1_ARGS_KWARGS
        from metaworld.types import Task

        if task not in ALL_V3_ENVIRONMENTS:
            raise UserError(f"Unknown Meta-World task '{task}'; see icrt.envs.available_tasks.")
        for cam in cameras:
            if cam not in CAMERAS:
                raise UserError(
                    f"Unknown Meta-World camera '{cam}'; choose from {', '.join(CAMERAS)}."
                )
        check_env_args(image_size, cameras, max_steps)
        self.task = task
        self.cameras = tuple(cameras)
        self.image_size = int(image_size)
        self.render_size = int(render_size)
        self.max_steps = int(max_steps or DEFAULT_MAX_STEPS)
        self.action_dim = 4
        self.fps = FPS
        cls = ALL_V3_ENVIRONMENTS[task]
        self._env = cls()
        kwargs = dict(ML1_ARGS_KWARGS[task]["kwargs"])
        del kwargs["task_id"]
        data = dict(kwargs, rand_vec=np.zeros(1), env_cls=cls, partially_observable=False)
        self._env.set_task(Task(env_name=task, data=pickle.dumps(data)))
        # draw positions from the task's space with the episode seed instead of a frozen vector
        self._env._freeze_rand_vec = False
        self._env.seeded_rand_vec = True
        self._env.max_path_length = max(self.max_steps, self._env.max_path_length)
        self._renderers: dict[int, Any] = {}
        self._steps = 0
        self._last_obs: np.ndarray | None = None

    # ------------------------------------------------------------------ protocol

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        self._env.seed(int(seed))
        obs, _ = self._env.reset()
        self._steps = 0
        return self._observe(obs)

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, dict]:
        action = np.clip(np.asarray(action, np.float64).reshape(-1), -1.0, 1.0)
        if action.shape != (4,):
            raise ValueError(f"Meta-World actions have 4 entries, got {action.shape}")
        obs, reward, _, _, info = self._env.step(action)
        self._steps += 1
        done = self._steps >= self.max_steps
        return self._observe(obs), float(reward), done, {"success": bool(info["success"])}

    def render(self) -> np.ndarray:
        return self._render("corner", self.render_size)

    def obs_meta(self) -> dict[str, dict]:
        return {}

    def close(self) -> None:
        for r in self._renderers.values():
            r.close()
        self._renderers.clear()
        self._env.close()

    # ------------------------------------------------------------------ helpers

    def _observe(self, obs: np.ndarray) -> dict[str, np.ndarray]:
        self._last_obs = obs
        out = {"state": obs.astype(np.float32), "proprio": obs[:4].astype(np.float32)}
        for cam in self.cameras:
            out[f"image_{cam}"] = self._render(cam, self.image_size)
        return out

    def _render(self, camera: str, size: int) -> np.ndarray:
        renderer = self._renderers.get(size)
        if renderer is None:
            _disable_costly_rendering(self._env.model)
            renderer = self._renderers[size] = make_renderer(self._env.model, size)
        renderer.update_scene(self._env.data, camera=camera)
        frame = renderer.render()
        # Meta-World's corner cameras are mounted upside down
        return np.ascontiguousarray(frame[::-1, ::-1]) if camera.startswith("corner") else frame


class MetaWorldExpert:
    """Meta-World's own scripted policy for the task (reads the full observation)."""

    # a function of the current observation only: it can label any state (DAgger)
    stateless = True

    def __init__(self, task: str) -> None:
        from metaworld.policies import ENV_POLICY_MAP

        if task not in ENV_POLICY_MAP:
            raise UserError(f"Meta-World ships no scripted policy for '{task}'.")
        self._policy = ENV_POLICY_MAP[task]()

    def reset(self, env: MetaWorldEnv) -> None:
        pass

    def act(self, env: MetaWorldEnv, obs: dict[str, np.ndarray]) -> np.ndarray:
        # the scripted policies parse Meta-World's float64 observation
        raw = env._last_obs if env._last_obs is not None else obs["state"].astype(np.float64)
        return np.clip(self._policy.get_action(raw), -1.0, 1.0).astype(np.float32)


def make_metaworld_expert(task: str) -> MetaWorldExpert:
    return MetaWorldExpert(task)
