"""The one episode loop: collection, evaluation and the expert checker all run episodes here.

    obs = env.reset(seed); expert.reset(env)
    ep = run_episode(env, obs, lambda o: expert.act(env, o), record=True)
    ep.success, ep.length, ep.data["action"]      # (T, A), observations as (T, ...) arrays

An episode ends at the simulator's first success (or ``post_success_steps`` after it), when it
reports ``done``, or at ``env.max_steps``.
"""

from __future__ import annotations

import os
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


class EpisodeRunner:
    """One episode driven a step at a time, for callers that step several simulators
    together (batched evaluation); :func:`run_episode` is the closed loop over it.

        runner = EpisodeRunner(env, env.reset(seed))
        while not runner.done:
            runner.step(policy(runner.obs))
        ep = runner.finish()
    """

    def __init__(
        self,
        env: Env,
        obs: dict[str, np.ndarray],
        *,
        record: bool = False,
        render: bool = False,
        post_success_steps: int = 0,
        watch: Callable[[], bool] | None = None,
    ) -> None:
        self.env, self.obs = env, obs
        self.record, self.render = record, render
        self.post_success_steps, self.watch = post_success_steps, watch
        self.ep = Episode()
        self.done = env.max_steps <= 0
        self._steps: dict[str, list[Any]] = {k: [] for k in obs} if record else {}
        self._actions: list[np.ndarray] = []
        self._rewards: list[float] = []
        if render:
            self.ep.frames.append(env.render())

    def step(self, action: np.ndarray) -> None:
        """Execute ``action`` from ``self.obs``; sets ``done`` when the episode is over."""
        ep, env = self.ep, self.env
        action = np.asarray(action, np.float32)
        if self.record:
            for k, v in self.obs.items():
                self._steps[k].append(v)
            self._actions.append(action)
        t0, c0 = time.perf_counter(), time.process_time()
        self.obs, reward, done, info = env.step(action)
        ep.sim_seconds += time.perf_counter() - t0
        ep.sim_cpu_seconds += time.process_time() - c0
        ep.length += 1
        ep.total_return += float(reward)
        self._rewards.append(reward)
        if self.render:
            ep.frames.append(env.render())
        if self.watch is not None:
            ep.watched = bool(self.watch()) or ep.watched
        if info["success"] and ep.success_step is None:
            ep.success, ep.success_step = True, ep.length
        self.done = (done or ep.length >= env.max_steps
                     or (ep.success and ep.length >= ep.success_step + self.post_success_steps))

    def finish(self) -> Episode:
        """The episode (with its recorded data when ``record``)."""
        if self.record:
            self.ep.data = {k: np.stack(v) for k, v in self._steps.items()}
            self.ep.data["action"] = np.stack(self._actions)
            self.ep.data["reward"] = np.asarray(self._rewards, np.float32)
        return self.ep


def run_episode(
    env: Env,
    obs: dict[str, np.ndarray],
    act: Callable[[dict[str, np.ndarray]], np.ndarray],
    **options: Any,
) -> Episode:
    """Run ``act`` from the reset observation ``obs`` (options: see :class:`EpisodeRunner`).
    ``record`` keeps every observation, action and reward (as a store episode: observations
    before each action); ``render`` keeps a frame before the first step and after every step;
    ``watch`` is asked after every step (e.g. whether another task than the env's was done;
    ``Episode.watched``: it said yes at some step)."""
    runner = EpisodeRunner(env, obs, **options)
    while not runner.done:
        runner.step(act(runner.obs))
    return runner.finish()


def worker_pool(workers: int, initializer: Callable[..., None], initargs: tuple = ()):
    """Processes for simulator episodes: spawned (MuJoCo's GL contexts and torch's threads do
    not survive a fork), each set up once by ``initializer``."""
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"),
                               initializer=_watched_init,
                               initargs=(os.getpid(), initializer, initargs))


def _watched_init(parent: int, initializer: Callable[..., None], initargs: tuple) -> None:
    """A worker exits once its parent is gone (killed mid-rollout, it would otherwise keep
    running its episode and hold the CPU)."""
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()
    initializer(*initargs)
