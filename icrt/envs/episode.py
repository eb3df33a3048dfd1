"""The one episode loop: collection, evaluation and the expert checker all run episodes here.

    obs = env.reset(seed); expert.reset(env)
    ep = run_episode(env, obs, lambda o: expert.act(env, o), record=True)
    ep.success, ep.length, ep.data["action"]      # (T, A), observations as (T, ...) arrays

An episode ends at the simulator's first success (or ``post_success_steps`` after it), when it
reports ``done``, or at ``env.max_steps``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from icrt.envs.base import Env


@dataclass
class Episode:
    success: bool = False
    length: int = 0
    total_return: float = 0.0
    success_step: int | None = None  # 1-based step of the first success
    data: dict[str, np.ndarray] = field(default_factory=dict)  # with record=True
    frames: list[np.ndarray] = field(default_factory=list)  # with render=True
    sim_seconds: float = 0.0  # wall time inside env.step
    sim_cpu_seconds: float = 0.0  # process CPU time inside env.step
    watched: bool = False  # ``watch`` became true at some step


def run_episode(
    env: Env,
    obs: dict[str, np.ndarray],
    act: Callable[[dict[str, np.ndarray]], np.ndarray],
    *,
    record: bool = False,
    render: bool = False,
    post_success_steps: int = 0,
    watch: Callable[[], bool] | None = None,
) -> Episode:
    """Run ``act`` from the reset observation ``obs``. ``record`` keeps every observation,
    action and reward (as a store episode: observations before each action); ``render`` keeps a
    frame before the first step and after every step; ``watch`` is asked after every step (e.g.
    whether another task than the env's was done)."""
    ep = Episode()
    steps: dict[str, list[Any]] = {k: [] for k in obs} if record else {}
    actions, rewards = [], []
    if render:
        ep.frames.append(env.render())
    while ep.length < env.max_steps:
        action = np.asarray(act(obs), np.float32)
        if record:
            for k, v in obs.items():
                steps[k].append(v)
            actions.append(action)
        t0, c0 = time.perf_counter(), time.process_time()
        obs, reward, done, info = env.step(action)
        ep.sim_seconds += time.perf_counter() - t0
        ep.sim_cpu_seconds += time.process_time() - c0
        ep.length += 1
        ep.total_return += float(reward)
        rewards.append(reward)
        if render:
            ep.frames.append(env.render())
        if watch is not None and not ep.watched:
            ep.watched = bool(watch())
        if info["success"] and ep.success_step is None:
            ep.success, ep.success_step = True, ep.length
        if done or (ep.success and ep.length >= ep.success_step + post_success_steps):
            break
    if record:
        ep.data = {k: np.stack(v) for k, v in steps.items()}
        ep.data["action"] = np.stack(actions)
        ep.data["reward"] = np.asarray(rewards, np.float32)
    return ep


def worker_pool(workers: int, initializer: Callable[..., None], initargs: tuple = ()):
    """Processes for simulator episodes: spawned (MuJoCo's GL contexts and torch's threads do
    not survive a fork), each set up once by ``initializer``."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=initializer,
                               initargs=initargs)
