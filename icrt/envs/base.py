"""The environment protocol every simulator adapter implements, and a registry by name.

An adapter is created for one task and is reused across episodes:

    env = make_env("metaworld", "reach-v3", image_size=64, cameras=("corner",))
    obs = env.reset(seed=3)                    # dict of numpy arrays, keys as in the store
    obs, reward, done, info = env.step(action) # info["success"] is the simulator's verdict
    frame = env.render()                       # (H, W, 3) uint8 for videos
    env.close()

Observation keys match the episode-store keys written by ``scripts/collect.py``
(``state``, ``proprio``, ``image_<camera>``), so a policy trained on a store can be fed the
adapter's observations unchanged. Heavy simulator imports happen inside the adapters.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from icrt.errors import UserError


class Env(Protocol):
    """A single-task simulator episode runner."""

    task: str
    max_steps: int
    action_dim: int
    fps: float  # control rate, stored with collected episodes

    def reset(self, seed: int) -> dict[str, np.ndarray]: ...

    def obs_meta(self) -> dict[str, dict[str, Any]]:
        """Extra store metadata per observation key (e.g. ``{"rotation": {...}}``)."""
        ...

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, dict[str, Any]]:
        """Apply one action; returns (obs, reward, done, info) with ``info["success"]`` a bool."""
        ...

    def render(self) -> np.ndarray: ...

    def close(self) -> None: ...


class Expert(Protocol):
    """A scripted demonstrator for one task: maps the adapter's observation to an action."""

    def reset(self, env: Env) -> None: ...

    def act(self, env: Env, obs: dict[str, np.ndarray]) -> np.ndarray: ...


@dataclass(frozen=True)
class Simulator:
    """One registry entry per simulator; "module:function" strings import lazily, which keeps
    ``import icrt`` light. Adding a simulator is one adapter module plus one entry here."""

    make_env: str  # builds an Env for a task (keyword-only options)
    tasks: str  # lists the task names
    make_expert: str  # builds the scripted expert of a task
    default_cameras: tuple[str, ...]  # rendered when images are asked for without cameras


SIMULATORS: dict[str, Simulator] = {
    "metaworld": Simulator("icrt.envs.metaworld:MetaWorldEnv",
                           "icrt.envs.metaworld:metaworld_tasks",
                           "icrt.envs.metaworld:make_metaworld_expert", ("corner", "gripperPOV")),
    "robosuite": Simulator("icrt.envs.robosuite:make_robosuite_env",
                           "icrt.envs.robosuite:robosuite_tasks",
                           "icrt.envs.robosuite:make_robosuite_expert",
                           ("agentview", "robot0_eye_in_hand")),
    # a point mass reaching a goal: seconds-long tests of collection, training, PPO, DAgger
    "toy": Simulator("icrt.envs.toy:make_toy_env", "icrt.envs.toy:toy_tasks",
                     "icrt.envs.toy:make_toy_expert", ()),
}


def _load(spec: str) -> Callable[..., Any]:
    module, name = spec.split(":")
    return getattr(importlib.import_module(module), name)


def env_names() -> list[str]:
    return sorted(SIMULATORS)


def _check_env(name: str) -> None:
    if name not in SIMULATORS:
        raise UserError(f"Unknown environment '{name}'; choose one of {', '.join(env_names())}.")


def available_tasks(env: str) -> list[str]:
    _check_env(env)
    return list(_load(SIMULATORS[env].tasks)())


def check_tasks(env: str, tasks: Sequence[str]) -> None:
    """Raise a UserError naming the first task the adapter does not know."""
    if not tasks:
        raise UserError(f"No tasks given for environment '{env}'; pass --tasks NAME [NAME ...].")
    import difflib

    known = available_tasks(env)
    for t in tasks:
        if t not in known:
            close = difflib.get_close_matches(t, known, n=3, cutoff=0.6)
            hint = (f"did you mean {' or '.join(repr(c) for c in close)}?" if close
                    else f"known tasks include {', '.join(known[:8])}, ...")
            raise UserError(f"Unknown {env} task '{t}'; {hint}")


def make_env(env: str, task: str, **kwargs: Any) -> Env:
    """Build the adapter for ``task`` of simulator ``env`` (kwargs: image_size, cameras, ...)."""
    import inspect

    _check_env(env)
    factory = _load(SIMULATORS[env].make_env)
    accepted = [n for n, p in inspect.signature(factory).parameters.items()
                if p.kind == p.KEYWORD_ONLY]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:  # a misspelt option must not be silently dropped
        raise UserError(f"The {env} adapter does not take {', '.join(unknown)}; it takes "
                        f"{', '.join(accepted)}.")
    return factory(task, **kwargs)


def default_cameras(env: str) -> tuple[str, ...]:
    _check_env(env)
    return SIMULATORS[env].default_cameras


def make_expert(env: str, task: str) -> Expert:
    _check_env(env)
    return _load(SIMULATORS[env].make_expert)(task)


# Episode seeds are drawn from separate streams per purpose, so demonstrations, held-out
# prompts and evaluation episodes never share an initial state.
SEED_STREAMS = {"train": 0, "prompt": 1, "eval": 2, "rl": 3, "dagger": 4}


def check_env_args(image_size: int, cameras: Sequence[str], max_steps: int | None) -> None:
    """The argument checks every adapter shares (camera names are the adapter's own)."""
    if image_size < 0:
        raise UserError(f"The image size must be >= 0 (got {image_size}).")
    if cameras and image_size == 0:
        raise UserError("Cameras were requested without an image size (--image-size N).")
    if max_steps is not None and max_steps <= 0:
        raise UserError(f"The episode length limit must be positive (got {max_steps}).")


def make_renderer(model: Any, size: int) -> Any:
    """A headless ``mujoco.Renderer`` of ``size`` x ``size`` with shadows and reflections off.

    Software (Mesa) rendering loads its own LLVM; a CUDA build of torch that later imports
    triton (torch.compile, torchvision, timm) segfaults if triton's LLVM is loaded second, so
    triton's library is loaded first when it is installed.
    """
    import importlib.util

    if importlib.util.find_spec("triton") is not None:
        importlib.import_module("triton._C.libtriton")
    import mujoco

    try:
        renderer = mujoco.Renderer(model, height=size, width=size)
    except mujoco.FatalError as e:
        raise UserError(
            "MuJoCo could not open an OpenGL context; on a headless machine set "
            "MUJOCO_GL=egl (or osmesa) before anything imports mujoco."
        ) from e
    renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
    renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
    return renderer


def episode_seed(base_seed: int, stream: str, task: str, index: int) -> int:
    """The simulator seed of episode ``index`` of ``task`` in a stream (train/prompt/eval)."""
    import zlib

    entropy = [int(base_seed), SEED_STREAMS[stream], zlib.crc32(task.encode()), int(index)]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint32)[0] & 0x7FFFFFFF)
