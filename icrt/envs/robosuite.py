"""Robosuite adapter: Panda + OSC_POSE delta control on Lift, Stack, PickPlaceCan, NutAssemblySquare
and a 16-task pick-and-place family, behind the :class:`icrt.envs.base.Env` protocol.

The family ``PickPlace{Object}ToBin{k}`` keeps all four objects (milk, bread, cereal, can) in the
start bin and asks for one object in one of the four target bins. Every family task shares the
same scene, so only a prompt (a demonstration) tells a policy which (object, bin) pair is wanted;
robosuite's translucent "where each object belongs" markers are hidden for the same reason.

Robosuite and MuJoCo are imported lazily (inside functions) so that ``import icrt`` stays light.
Robosuite draws object placements and the robot's initial joint noise from NumPy's *global* RNG;
:meth:`RobosuiteEnv.reset` seeds it for the duration of the reset and restores it afterwards, which
makes resets deterministic per seed without disturbing the caller's random stream.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from icrt.envs.base import check_env_args, make_renderer
from icrt.envs.robosuite_tasks import (  # noqa: F401 (task names are part of this adapter's API)
    BASE_TASKS,
    DEFAULT_MAX_STEPS,
    FAMILY_OBJECTS,
    NUM_BINS,
    check_task,
    default_max_steps,
    parse_family_task,
    robosuite_tasks,
)
from icrt.errors import UserError

log = logging.getLogger(__name__)

RENDER_SIZE = 256
# Robosuite's own "object released" test: reach reward 1 - tanh(10 d) < 0.6 <=> d > atanh(0.4)/10.
_RELEASE_DIST = float(np.arctanh(0.4) / 10.0)
# Fixed seed for building the model: robosuite samples e.g. the Lift cube's size at build time.
_BUILD_SEED = 0
# Robosuite logs set-up advice at import and one line per unused controller part; none of it is
# actionable for icrt users, so those records are dropped (real warnings still get through).
_NOISY_LOG_PARTS = (
    "private macro",
    "setup_macros.py",
    "robosuite_models",
    "mink-based whole-body IK",
    "Loading controller configuration",
    "but the robot does not have this component",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(part in msg for part in _NOISY_LOG_PARTS)


def _import_robosuite() -> Any:
    """Import robosuite headless (EGL unless the user chose a GL backend), quiet its set-up log."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    rs_logger = logging.getLogger("robosuite_logs")
    if not any(isinstance(f, _DropNoise) for f in rs_logger.filters):
        rs_logger.addFilter(_DropNoise())
    import robosuite

    return robosuite


class _SeededGlobalRng:
    """Seed NumPy's global RNG inside a ``with`` block and restore the caller's state after."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self._saved = np.random.get_state()
        np.random.seed(self.seed)

    def __exit__(self, *exc: object) -> None:
        np.random.set_state(self._saved)


class RobosuiteEnv:
    """One robosuite task behind the icrt ``Env`` protocol (see the module docstring).

    Observations: ``state`` (robosuite's ``robot0_proprio-state`` + ``object-state``), ``proprio``
    (``robot0_eef_pos`` (3), ``robot0_eef_quat`` (4, xyzw, the hand body's orientation as in
    robomimic datasets), ``robot0_gripper_qpos`` (2)), ``object`` (``object-state``, robomimic's
    name for it) and ``image_<camera>`` for each requested camera. Actions are 7-D OSC_POSE
    deltas in the robot base frame (which is aligned with the world frame): ``dx, dy, dz``
    scaled by 0.05 m, ``dax, day, daz`` (axis-angle) scaled by 0.5 rad, and the gripper (-1
    open, +1 close), each in [-1, 1].
    """

    action_dim = 7

    def __init__(
        self,
        task: str,
        *,
        image_size: int = 0,
        cameras: tuple[str, ...] = (),
        max_steps: int | None = None,
        control_freq: int = 20,
    ) -> None:
        check_task(task)
        cameras = tuple(cameras)
        check_env_args(image_size, cameras, max_steps)
        if control_freq <= 0:
            raise UserError(f"control_freq must be positive, got {control_freq}.")
        self.task = task
        self.max_steps = int(max_steps) if max_steps is not None else default_max_steps(task)
        self.fps = float(control_freq)
        self.image_size = int(image_size)
        self.cameras = cameras
        self.seed: int | None = None
        self._family = parse_family_task(task)
        self._t = 0
        self._renderers: dict[int, Any] = {}
        self._geom_ids: dict[str, int] = {}
        self._closed = False

        robosuite = _import_robosuite()
        import mujoco

        self._mujoco = mujoco
        kwargs: dict[str, Any] = {}
        if self._family is not None:
            rs_name = "PickPlace"
            kwargs["single_object_mode"] = 0
        else:
            rs_name = task
        with _SeededGlobalRng(_BUILD_SEED):
            self.raw_env = robosuite.make(
                rs_name,
                robots="Panda",
                controller_configs=robosuite.load_composite_controller_config(robot="Panda"),
                has_renderer=False,
                has_offscreen_renderer=False,  # we render with mujoco.Renderer ourselves
                use_camera_obs=False,
                use_object_obs=True,
                reward_shaping=False,
                control_freq=control_freq,
                horizon=self.max_steps,
                ignore_done=True,  # episode length is ours to track
                hard_reset=False,  # keep one compiled model; reset only the state
                renderer="mujoco",
                **kwargs,
            )
        self._model = self.raw_env.sim.model._model
        self._data = self.raw_env.sim.data._data
        known = [self._model.camera(i).name for i in range(self._model.ncam)]
        bad = [c for c in cameras if c not in known]
        if bad:
            self.raw_env.close()
            raise UserError(
                f"Unknown camera '{bad[0]}' for robosuite {task}; choose from {', '.join(known)}."
            )
        self._setup_rendering()
        self._robot = self.raw_env.robots[0]
        self._eef_site = self._robot.eef_site_id["right"]
        if self._family is not None:
            name, k = self._family
            self.target_object = name
            self.target_bin = k

    # ------------------------------------------------------------------ protocol

    def reset(self, seed: int) -> dict[str, np.ndarray]:
        """Start an episode; object placements and the start pose depend only on the seed."""
        self.seed = int(seed)
        self._t = 0
        with _SeededGlobalRng(self.seed):
            raw = self.raw_env.reset()
        return self._obs(raw)

    def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, dict[str, Any]]:
        """Apply one OSC_POSE action; ``done`` only marks max_steps (success does not end it)."""
        if self.seed is None:
            raise UserError("Call reset(seed) before step().")
        action = np.asarray(action, dtype=np.float64).reshape(-1)
        if action.shape != (self.action_dim,):
            raise UserError(
                f"Expected a {self.action_dim}-D action for robosuite, got shape {action.shape}."
            )
        raw, reward, _, _ = self.raw_env.step(np.clip(action, -1.0, 1.0))
        self._t += 1
        success = self.check_success()
        if self._family is not None:
            reward = float(success)
        done = self._t >= self.max_steps
        return self._obs(raw), float(reward), done, {"success": success, "t": self._t}

    def render(self) -> np.ndarray:
        """An upright (H, W, 3) uint8 agentview frame for videos (image_size, or 256 if 0)."""
        return self._render("agentview", self.image_size or RENDER_SIZE)

    def obs_meta(self) -> dict[str, dict]:
        """Where rotations sit inside vector observations (for 6-D rotation features)."""
        return {"proprio": {"rotation": {"start": 3, "format": "quat_xyzw"}}}

    def close(self) -> None:
        for r in self._renderers.values():
            r.close()
        self._renderers.clear()
        if not self._closed:
            self._closed = True
            self.raw_env.close()

    # ------------------------------------------------------------------ success

    def check_success(self) -> bool:
        """The simulator's verdict for this task on the current state (see the module docstring)."""
        if self._family is None:
            return bool(self.raw_env._check_success())
        return self.object_in_bin(self.target_object, self.target_bin, require_release=True)

    def task_success(self, task: str) -> bool:
        """Whether another family task (same scene, another object or bin) is done now."""
        family = parse_family_task(task)
        if self._family is None or family is None:
            raise UserError(f"Only the pick-and-place family can judge another task; "
                            f"'{self.task}' cannot judge '{task}'.")
        return self.object_in_bin(family[0], family[1], require_release=True)

    def tasks_done(self) -> list[str]:
        """The tasks done now. For the pick-and-place family every (object, bin) pair is
        checked (placed and released), which tells an evaluation whether a policy placed the
        wrong object, used the wrong bin, or placed nothing; other tasks judge only themselves."""
        if self._family is None:
            return [self.task] if self.check_success() else []
        return [f"PickPlace{obj}ToBin{k}" for obj in FAMILY_OBJECTS
                for k in range(1, NUM_BINS + 1)
                if self.object_in_bin(obj, k, require_release=True)]

    def object_in_bin(self, obj: str, k: int, *, require_release: bool = True) -> bool:
        """Whether family object ``obj`` lies in target bin ``k`` (1..4), as robosuite checks it.

        Robosuite's PickPlace counts an object as placed when it is inside its bin's quadrant (and
        at most 0.1 m above the bin floor) and the gripper has let go of it (eef farther than
        ~4.2 cm); this applies the same test to an arbitrary bin.
        """
        env = self.raw_env
        obj_pos = self._data.xpos[env.obj_body_id[obj]]
        inside = not env.not_in_bin(obj_pos, k - 1)
        if not require_release:
            return bool(inside)
        dist = float(np.linalg.norm(self._data.site_xpos[self._eef_site] - obj_pos))
        return bool(inside and dist > _RELEASE_DIST)

    def bin_bounds(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(low, high) world xy corners of target bin ``k``'s quadrant, as in ``not_in_bin``."""
        env = self.raw_env
        low = np.array(env.bin2_pos[:2], dtype=np.float64)
        if k - 1 in (0, 2):
            low[0] -= env.bin_size[0] / 2
        if k - 1 < 2:
            low[1] -= env.bin_size[1] / 2
        return low, low + np.array(env.bin_size[:2]) / 2

    def bin_center(self, k: int) -> np.ndarray:
        """World (x, y, z-floor-reference) centre of target bin ``k`` (1..4)."""
        return np.array(self.raw_env.target_bin_placements[k - 1], dtype=np.float64)

    # ------------------------------------------------------------------ privileged state

    def object_names(self) -> list[str]:
        """Names of the movable objects, as used in :meth:`sim_state` keys."""
        env = self.raw_env
        if self.task == "Lift":
            return ["cube"]
        if self.task == "Stack":
            return ["cubeA", "cubeB"]
        if self.task == "NutAssemblySquare":
            return ["SquareNut"]
        if self.task == "PickPlaceCan":
            return ["Can"]
        return [o.name for o in env.objects]

    def _object_body(self, name: str) -> int:
        env = self.raw_env
        if self.task == "Lift":
            return env.cube_body_id
        if self.task == "Stack":
            return env.cubeA_body_id if name == "cubeA" else env.cubeB_body_id
        return env.obj_body_id[name]

    def _object_geom(self, name: str) -> int:
        """The object's first collision geom (its frame carries the mesh's own orientation)."""
        if name not in self._geom_ids:
            body = self._object_body(name)
            m = self._model
            ids = [g for g in range(m.ngeom) if m.geom_bodyid[g] == body and m.geom_contype[g]]
            self._geom_ids[name] = ids[0]
        return self._geom_ids[name]

    def sim_state(self) -> dict[str, np.ndarray]:
        """Privileged simulator state for scripted experts (copies; world frame).

        Keys: ``eef_pos``, ``eef_mat`` (grip-site rotation; its x axis is the finger closing axis,
        its z axis the approach direction), ``gripper_qpos``, ``arm_qpos`` (7 joints),
        ``base_pos`` (robot base), and per object ``<name>_pos``,
        ``<name>_mat`` (body), ``<name>_geom_pos``, ``<name>_geom_mat`` and ``<name>_half``
        (collision geom frame and its bounding-box half sizes). Task extras: ``table_z`` (Lift,
        Stack, NutAssemblySquare), ``handle_pos``/``peg_pos`` (NutAssemblySquare), ``target_pos``
        ``target_low``/``target_high`` (the goal bin's centre and xy corners) and
        ``source_low``/``source_high`` (the start bin's xy corners; PickPlaceCan and the family).
        """
        m, d = self._model, self._data
        s: dict[str, np.ndarray] = {
            "eef_pos": d.site_xpos[self._eef_site].copy(),
            "eef_mat": d.site_xmat[self._eef_site].reshape(3, 3).copy(),
            "gripper_qpos": np.array(
                [d.qpos[i] for i in self._robot._ref_gripper_joint_pos_indexes["right"]]
            ),
            "arm_qpos": d.qpos[self._robot._ref_joint_pos_indexes].copy(),
            "base_pos": np.array(self._robot.base_pos, dtype=np.float64),
        }
        for name in self.object_names():
            b = self._object_body(name)
            g = self._object_geom(name)
            s[f"{name}_pos"] = d.xpos[b].copy()
            s[f"{name}_mat"] = d.xmat[b].reshape(3, 3).copy()
            s[f"{name}_geom_pos"] = d.geom_xpos[g].copy()
            s[f"{name}_geom_mat"] = d.geom_xmat[g].reshape(3, 3).copy()
            s[f"{name}_half"] = m.geom_aabb[g][3:].copy()
        env = self.raw_env
        if self.task in ("Lift", "Stack", "NutAssemblySquare"):
            s["table_z"] = np.array(env.table_offset[2], dtype=np.float64)
        if self.task == "NutAssemblySquare":
            s["handle_pos"] = d.site_xpos[env.object_site_ids[0]].copy()
            s["peg_pos"] = d.xpos[env.peg1_body_id].copy()
        k = 4 if self.task == "PickPlaceCan" else self.target_bin if self._family else 0
        if k:
            s["target_pos"] = self.bin_center(k)
            s["target_low"], s["target_high"] = self.bin_bounds(k)
            half = np.array(env.bin_size[:2]) / 2
            s["source_low"] = np.array(env.bin1_pos[:2]) - half
            s["source_high"] = np.array(env.bin1_pos[:2]) + half
        return s

    def flat_state(self) -> np.ndarray:
        """The flattened MuJoCo state (time, qpos, qvel), as robomimic records ``states``."""
        return np.asarray(self.raw_env.sim.get_state().flatten(), dtype=np.float64)

    def render_flat_state(self, state: np.ndarray, camera: str, size: int) -> np.ndarray:
        """Set the simulator to a recorded :meth:`flat_state` and render one camera
        (robomimic's ``dataset_states_to_obs``); a state of another model is one sentence."""
        state = np.asarray(state, dtype=np.float64).reshape(-1)
        want = self.flat_state().shape[0]
        if state.shape[0] != want:
            raise UserError(
                f"A recorded simulator state has {state.shape[0]} values but robosuite "
                f"{self.task} here has {want}; it was recorded with another robosuite version "
                f"or model, so its frames cannot be re-rendered."
            )
        self.raw_env.sim.set_state_from_flattened(state)
        self.raw_env.sim.forward()
        return self._render(camera, size)

    def set_object_pose(
        self, name: str, pos: np.ndarray, quat_wxyz: np.ndarray | None = None
    ) -> None:
        """Teleport a free-jointed object (for tests and tools) and recompute derived quantities."""
        env = self.raw_env
        if self.task == "Lift":
            joint = env.cube.joints[0]
        elif self.task == "Stack":
            joint = (env.cubeA if name == "cubeA" else env.cubeB).joints[0]
        elif self.task == "NutAssemblySquare":
            joint = env.nuts[0].joints[0]
        else:
            joint = next(o for o in env.objects if o.name == name).joints[0]
        q = np.array([1.0, 0.0, 0.0, 0.0]) if quat_wxyz is None else np.asarray(quat_wxyz)
        env.sim.data.set_joint_qpos(joint, np.concatenate([np.asarray(pos, dtype=float), q]))
        self._mujoco.mj_forward(self._model, self._data)

    # ------------------------------------------------------------------ internals

    def _obs(self, raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        obs = {
            "state": np.concatenate([raw["robot0_proprio-state"], raw["object-state"]]).astype(
                np.float32
            ),
            "proprio": np.concatenate(
                [raw["robot0_eef_pos"], raw["robot0_eef_quat"], raw["robot0_gripper_qpos"]]
            ).astype(np.float32),
            # robosuite's object-state under robomimic's name, so converted robomimic datasets
            # (proprio + object) evaluate here
            "object": raw["object-state"].astype(np.float32),
        }
        for cam in self.cameras:
            obs[f"image_{cam}"] = self._render(cam, self.image_size)
        return obs

    def _setup_rendering(self) -> None:
        """Make software (Mesa) rendering cheap: no shadows, reflections or multisampling (about
        half the cost of a frame together), and hide the family's target markers."""
        m = self._model
        m.light_castshadow[:] = 0
        m.mat_reflectance[:] = 0.0
        m.vis.quality.offsamples = 0
        size = max(self.image_size, RENDER_SIZE)
        m.vis.global_.offwidth = max(int(m.vis.global_.offwidth), size)
        m.vis.global_.offheight = max(int(m.vis.global_.offheight), size)
        # like robosuite's own renderer: visual meshes (group 1) only, no collision geoms or sites
        self._vopt = self._mujoco.MjvOption()
        self._vopt.geomgroup[0] = 0
        self._vopt.sitegroup[:] = 0
        if self._family is not None:
            # robosuite's fixed object->bin markers would contradict the family's chosen bin
            for vis in self.raw_env.visual_objects:
                body = self.raw_env.obj_body_id[vis.name]
                m.geom_rgba[m.geom_bodyid == body, 3] = 0.0

    def _render(self, camera: str, size: int) -> np.ndarray:
        mujoco = self._mujoco
        r = self._renderers.get(size)
        if r is None:
            r = make_renderer(self._model, size)
            # the arenas' walls and floor hide the skybox from every camera; skip drawing it
            r.scene.flags[mujoco.mjtRndFlag.mjRND_SKYBOX] = 0
            self._renderers[size] = r
        r.update_scene(self._data, camera=camera, scene_option=self._vopt)
        return r.render().copy()


def make_robosuite_env(
    task: str,
    *,
    image_size: int = 0,
    cameras: tuple[str, ...] = (),
    max_steps: int | None = None,
    control_freq: int = 20,
) -> RobosuiteEnv:
    """Build the adapter for one robosuite task (see :class:`RobosuiteEnv`)."""
    return RobosuiteEnv(
        task,
        image_size=image_size,
        cameras=tuple(cameras),
        max_steps=max_steps,
        control_freq=control_freq,
    )


def make_robosuite_expert(task: str) -> Any:
    """The scripted demonstrator for ``task`` (reads privileged state via ``env.sim_state()``)."""
    check_task(task)
    from icrt.envs.experts.robosuite_experts import make_expert

    return make_expert(task)
