"""robomimic HDF5 datasets (robosuite demonstrations) -> icrt episode store.

robomimic's layout::

    data/                       attrs: total (steps), env_args (JSON: env_name, type,
                                env_kwargs with robots, controller_configs, control_freq, ...)
      demo_N/                   attrs: num_samples; datasets actions (T, A), rewards (T,),
                                dones (T,), states (T, S) (flattened MuJoCo states)
        obs/<key>               low-dim (T, D) float, or camera frames <camera>_image (T, H, W, 3)
    mask/train, mask/valid      demo names of robomimic's own split

What a converted store holds:

* every kept low-dim key under its robomimic name (``object``, ``robot0_eef_pos``, ...), plus
  ``proprio`` = eef position + eef quaternion (xyzw) + gripper positions when those three are
  there: the robot-only key of icrt's robosuite adapter, which also produces ``object``, so a
  policy trained on ``proprio`` + ``object`` (the dataset JSON's default) evaluates in robosuite
  with ``scripts/eval.py`` and no extra flags;
* cameras as ``image_<camera>`` (uint8, resized with ``--image-size``), or re-rendered from the
  recorded ``states`` with ``--render-cameras`` (robomimic's ``dataset_states_to_obs``);
* ``action``; the task is ``env_args.env_name``; success is a positive reward at some step
  (robomimic's demonstrations end at success); robomimic's ``mask/valid`` becomes the store's
  validation split.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from icrt.config import ConvertConfig
from icrt.data.convert import (
    Episode,
    Layout,
    check_same_length,
    resize_frames,
    select_names,
)
from icrt.errors import UserError

log = logging.getLogger(__name__)

PROPRIO_PARTS = ("robot0_eef_pos", "robot0_eef_quat", "robot0_gripper_qpos")


def _demo_number(name: str) -> int:
    try:
        return int(name.rsplit("_", 1)[1])
    except (IndexError, ValueError):
        return -1


def robosuite_task(env_args: dict[str, Any]) -> str | None:
    """icrt's robosuite task for robomimic's env_args, or None when icrt's adapter would not
    reproduce that environment (another simulator, robot or controller)."""
    from icrt.envs.robosuite_tasks import BASE_TASKS

    name = env_args.get("env_name")
    kwargs = env_args.get("env_kwargs", {}) or {}
    robots = kwargs.get("robots", ["Panda"])
    robots = [robots] if isinstance(robots, str) else list(robots)
    ctrl = kwargs.get("controller_configs") or {}
    # robosuite <= 1.4: {"type": "OSC_POSE", ...}; 1.5: a composite {"body_parts": {"right": ...}}
    arm = ((ctrl.get("body_parts") or {}).get("right") or ctrl) if ctrl else {"type": "OSC_POSE"}
    if name not in BASE_TASKS or robots != ["Panda"] or arm.get("type") != "OSC_POSE":
        return None
    if arm.get("control_delta", True) is False or kwargs.get("control_freq", 20) != 20:
        return None
    return name


class RobomimicReader:
    def __init__(self, cfg: ConvertConfig) -> None:
        import h5py

        self.env: Any = None  # a simulator, made when frames are re-rendered
        self.file: Any = None
        path = Path(cfg.input)
        if not path.is_file():
            raise UserError(f"robomimic dataset '{path}' does not exist.")
        try:
            self.file = h5py.File(path, "r")
        except OSError:
            raise UserError(f"'{path}' is not an HDF5 file (a robomimic dataset is one).") from None
        self.path = path
        self.cfg = cfg
        data = self.file.get("data")
        if not isinstance(data, h5py.Group):
            self.close()
            raise UserError(f"'{path}' is not a robomimic dataset: it has no 'data' group.")
        self.demos = sorted((k for k in data if _demo_number(k) >= 0), key=_demo_number)
        if not self.demos:
            self.close()
            raise UserError(f"'{path}' is not a robomimic dataset: 'data' holds no demo_N groups.")
        try:
            self.env_args = json.loads(data.attrs.get("env_args", "{}"))
        except (TypeError, json.JSONDecodeError):
            self.close()
            raise UserError(f"'{path}': data attribute 'env_args' is not valid JSON.") from None
        self.task = str(self.env_args.get("env_name") or path.stem)
        self.num_episodes = len(self.demos)
        first = data[self.demos[0]]
        obs = first.get("obs")
        if "actions" not in first or not isinstance(obs, h5py.Group):
            self.close()
            raise UserError(f"'{path}' demo '{self.demos[0]}' lacks 'actions' or 'obs'.")
        lowdim, cameras = [], []
        for key, ds in obs.items():
            if key.endswith("_image") and ds.dtype == np.uint8 and ds.ndim == 4 \
                    and ds.shape[-1] == 3:
                cameras.append(key.removesuffix("_image"))
            elif ds.ndim == 2 and ds.dtype.kind == "f":
                lowdim.append(key)
            else:
                log.info("%s: skipping obs key '%s' (%s %s)", path, key, ds.dtype, ds.shape)
        where = f"'{path}'"
        self.lowdim = select_names(cfg.keys, sorted(lowdim), "--keys",
                                   f"{where}'s low-dim observation keys", self.close)
        self.cameras = select_names(cfg.cameras, sorted(cameras), "--cameras",
                                    f"{where}'s cameras", self.close)
        self.render_cameras = tuple(cfg.render_cameras)
        self.sim_task = robosuite_task(self.env_args)
        if self.render_cameras:
            if "states" not in first:
                self.close()
                raise UserError(f"--render-cameras needs recorded simulator states, but "
                                f"'{path}' demo '{self.demos[0]}' has no 'states'.")
            if self.sim_task is None:
                self.close()
                raise UserError(f"--render-cameras: '{path}' was recorded in "
                                f"{self.env_args.get('env_name')!r}, which icrt's robosuite "
                                f"adapter does not reproduce.")
        mask = self.file.get("mask")
        self.valid: set[str] = set()
        self.has_split = False
        if isinstance(mask, h5py.Group) and "valid" in mask:
            self.valid = {v.decode() if isinstance(v, bytes) else str(v) for v in mask["valid"][:]}
            self.has_split = True

    def layout(self) -> Layout:
        derived = all(k in self.lowdim for k in PROPRIO_PARTS)
        if derived:
            proprio_keys = ["proprio"] + (["object"] if "object" in self.lowdim else [])
        else:
            proprio_keys = list(self.lowdim)
        cams = [*self.cameras, *(c for c in self.render_cameras if c not in self.cameras)]
        key_meta = {"proprio": {"rotation": {"start": 3, "format": "quat_xyzw"}}} if derived \
            else {}
        size = self.cfg.image_size
        if cams and size is None:
            size = int(self.file["data"][self.demos[0]]["obs"][f"{self.cameras[0]}_image"]
                       .shape[1]) if self.cameras else None
        env: dict[str, Any] = {"name": "robosuite" if self.sim_task else None,
                               "cameras": cams, "image_size": size or 0,
                               "robomimic_env_args": self.env_args}
        if self.sim_task is None:
            log.warning("%s: env %r (robot/controller in env_args) is not one icrt's robosuite "
                        "adapter reproduces; evaluating needs a matching simulator",
                        self.path, self.env_args.get("env_name"))
        fps = float((self.env_args.get("env_kwargs") or {}).get("control_freq", 20))
        return Layout(proprio_keys=proprio_keys, action_keys=["action"],
                      image_keys=[f"image_{c}" for c in cams], env=env, fps=fps,
                      key_meta=key_meta, has_split=self.has_split)

    def is_valid(self, i: int) -> bool:
        return self.demos[i] in self.valid

    def episode(self, i: int) -> Episode:
        name = self.demos[i]
        demo = self.file["data"][name]
        where = f"'{self.path}' demo '{name}'"
        obs = demo.get("obs")
        if "actions" not in demo or obs is None:
            raise UserError(f"{where} lacks 'actions' or 'obs'.")
        data: dict[str, np.ndarray] = {"action": np.asarray(demo["actions"][:], np.float32)}
        for key in self.lowdim:
            if key not in obs:
                raise UserError(f"{where} has no obs key '{key}'.")
            data[key] = np.asarray(obs[key][:], np.float32)
        for cam in self.cameras:
            key = f"{cam}_image"
            if key not in obs:
                raise UserError(f"{where} has no camera '{key}'.")
            data[f"image_{cam}"] = resize_frames(obs[key][:], self.cfg.image_size)
        if self.render_cameras:
            if "states" not in demo:
                raise UserError(f"{where} has no 'states' to render --render-cameras from.")
            data.update(self._render(demo["states"][:]))
        for key, value in data.items():
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                step = int(np.flatnonzero(~np.isfinite(value.reshape(len(value), -1)).all(1))[0])
                raise UserError(f"{where}: '{key}' has a non-finite value at step {step}.")
        check_same_length(self.task, data, where)
        if all(k in data for k in PROPRIO_PARTS):
            data["proprio"] = np.concatenate([data[k] for k in PROPRIO_PARTS], axis=1)
        rewards = demo.get("rewards")
        success = bool(np.max(rewards[:]) > 0) if rewards is not None and len(rewards) else True
        return Episode(data=data, task=self.task, success=success)

    def _render(self, states: np.ndarray) -> dict[str, np.ndarray]:
        if self.env is None:
            from icrt.envs.robosuite import make_robosuite_env

            size = int(self.cfg.image_size or 0)
            self.env = make_robosuite_env(self.sim_task, image_size=size,
                                          cameras=self.render_cameras)
        size = int(self.cfg.image_size or 0)
        frames = {c: np.empty((len(states), size, size, 3), np.uint8)
                  for c in self.render_cameras}
        for t, state in enumerate(states):
            for c in self.render_cameras:
                frames[c][t] = self.env.render_flat_state(state, c, size)
        return {f"image_{c}": v for c, v in frames.items()}

    def close(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None
        if self.file is not None:
            self.file.close()
            self.file = None
