"""ICRT / DROID-style HDF5 datasets -> icrt episode store.

The input is ICRT's own dataset JSON::

    {"dataset_path": ["r2d2.hdf5", ...],            # one or more HDF5 files
     "hdf5_keys": ["hdf5_keys.json", ...],           # per file: a JSON list of episode names
     "epi_len_mapping_json": "epi_len_mapping.json", # {episode: length} (str or list)
     "verb_to_episode": "verb_to_episode.json",      # {task: [episodes]} (str or list)
     "train_split": 0.95,
     "action_keys": ["action/cartesian_position", "action/gripper_position"],
     "image_keys": ["observation/exterior_image_1_left", "observation/wrist_image_left"],
     "proprio_keys": ["observation/cartesian_position", "observation/gripper_position"]}

and every HDF5 file holds one group per episode with ``observation/...`` and ``action/...``
datasets (camera frames as uint8 (T, H, W, 3) arrays or as one encoded image per step).
Relative paths are looked up beside the JSON first, then in the working directory.

Store keys: ``observation/<name>`` becomes ``<name>``, ``action/<name>`` becomes
``action_<name>``, a camera ``observation/<camera>`` becomes ``image_<camera>``. A 6-D
``cartesian_position`` (x, y, z and Euler XYZ angles, DROID's convention) declares its rotation,
so ``--shared-cfg.rot-6d`` and delta actions work on it. Tasks come from ``verb_to_episode``;
episodes no task lists are left out (as ICRT's task-grouped sampling does), and the dataset
JSON keeps ICRT's ``train_split``.
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

REQUIRED = ("dataset_path", "hdf5_keys", "verb_to_episode", "action_keys", "proprio_keys")


def _as_list(value: Any) -> list:
    return [value] if isinstance(value, str) else list(value or [])


class IcrtReader:
    def __init__(self, cfg: ConvertConfig) -> None:
        import h5py

        self.cfg = cfg
        self.files: list[Any] = []
        path = Path(cfg.input)
        if not path.is_file():
            raise UserError(f"ICRT dataset JSON '{path}' does not exist.")
        try:
            spec = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"ICRT dataset JSON '{path}' is not valid JSON ({e}).") from None
        if not isinstance(spec, dict) or any(k not in spec for k in REQUIRED):
            missing = [k for k in REQUIRED if not isinstance(spec, dict) or k not in spec]
            raise UserError(f"'{path}' is not an ICRT dataset JSON: it lacks "
                            f"{', '.join(missing)}.")
        self.path = path
        self.spec = spec
        h5_paths = [self._find(p) for p in _as_list(spec["dataset_path"])]
        key_files = [self._find(p) for p in _as_list(spec["hdf5_keys"])]
        if len(h5_paths) != len(key_files):
            raise UserError(f"'{path}' lists {len(h5_paths)} dataset_path file(s) but "
                            f"{len(key_files)} hdf5_keys file(s); they pair up in order.")
        lengths: dict[str, int] = {}
        for p in _as_list(spec.get("epi_len_mapping_json")):
            lengths.update(self._json(self._find(p)))
        task_of: dict[str, str] = {}
        for p in _as_list(spec["verb_to_episode"]):
            for task, names in self._json(self._find(p)).items():
                for name in names:
                    task_of.setdefault(name, task)
        self.lengths = lengths
        self.episodes: list[tuple[int, str, str]] = []  # (file, episode, task)
        untasked = 0
        for fi, (h5, keys) in enumerate(zip(h5_paths, key_files, strict=True)):
            try:
                self.files.append(h5py.File(h5, "r"))
            except OSError:
                self.close()
                raise UserError(f"'{h5}' (dataset_path of '{path}') is not an HDF5 file.") \
                    from None
            for name in self._json(keys):
                if name not in task_of:
                    untasked += 1
                    continue
                self.episodes.append((fi, name, task_of[name]))
        if untasked:
            log.warning("%s: %d episode(s) belong to no task of verb_to_episode; left out",
                        path, untasked)
        self.num_episodes = len(self.episodes)
        self.proprio = [self._key(k, "observation/") for k in spec["proprio_keys"]]
        self.actions = [self._key(k, "action/") for k in spec["action_keys"]]
        cams = [self._key(k, "observation/") for k in spec.get("image_keys") or []]
        keep = select_names(cfg.cameras, [n for _, n in cams], "--cameras",
                            f"the image_keys of '{path}'", self.close)
        self.cameras = [c for c in cams if c[1] in keep]
        keep = select_names(cfg.keys, [n for _, n in self.proprio], "--keys",
                            f"the proprio_keys of '{path}'", self.close)
        self.proprio = [p for p in self.proprio if p[1] in keep]
        if cfg.render_cameras:
            self.close()
            raise UserError("--render-cameras needs recorded simulator states, which ICRT "
                            "datasets do not have.")

    def _find(self, p: str) -> Path:
        candidates = [Path(p)] if Path(p).is_absolute() else [self.path.parent / p, Path(p)]
        for c in candidates:
            if c.exists():
                return c
        self.close()
        raise UserError(f"'{p}' (named in '{self.path}') does not exist.")

    def _json(self, p: Path) -> Any:
        try:
            return json.loads(p.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            self.close()
            raise UserError(f"'{p}' (named in '{self.path}') is not valid JSON ({e}).") from None

    @staticmethod
    def _key(source: str, prefix: str) -> tuple[str, str]:
        """(HDF5 path inside an episode, its name without the group)."""
        return source, source.removeprefix(prefix).replace("/", "_")

    def layout(self) -> Layout:
        key_meta: dict[str, dict[str, Any]] = {}
        # shapes from the first episode's datasets, without reading (or decoding) its steps
        fi, name, _ = self.episodes[0] if self.num_episodes else (0, None, None)
        first = self.files[fi].get(name) if name is not None else None
        keys = [(s, n) for s, n in self.proprio] + [(s, f"action_{n}") for s, n in self.actions]
        for src, out in keys:
            if first is not None and src in first and "cartesian_position" in out \
                    and first[src].shape[-1] == 6:
                key_meta[out] = {"rotation": {"start": 3, "format": "euler_xyz"}}
        # DROID's action/cartesian_position holds absolute pose targets of the observed pose:
        # declared, so --shared-cfg.use-delta-action (ICRT's default) can train on deltas
        pose = [n for _, n in self.proprio if n == "cartesian_position"]
        if pose and "action_cartesian_position" in key_meta and pose[0] in key_meta:
            key_meta["action_cartesian_position"]["delta_reference"] = {"key": pose[0],
                                                                        "pos_dims": 3}
        size = self.cfg.image_size
        if self.cameras and size is None and first is not None and self.cameras[0][0] in first:
            ds = first[self.cameras[0][0]]
            size = int(ds.shape[1] if ds.ndim == 4 else
                       self._frames(ds[:1], f"'{name}'", self.cameras[0][0]).shape[1])
        fps = self.spec.get("fps")
        return Layout(
            proprio_keys=[n for _, n in self.proprio],
            action_keys=[f"action_{n}" for _, n in self.actions],
            image_keys=[f"image_{n}" for _, n in self.cameras],
            env={"name": None, "cameras": [n for _, n in self.cameras],
                 "image_size": size or 0, "icrt_dataset": str(self.path.resolve())},
            fps=float(fps) if fps else None, key_meta=key_meta,
            train_split=float(self.spec.get("train_split", 0.9)),
            task_grouping=(str(self._find(self.spec["task_grouping"]).resolve())
                           if self.spec.get("task_grouping") else None),
        )

    def is_valid(self, i: int) -> bool:
        return False

    def episode(self, i: int) -> Episode:
        fi, name, task = self.episodes[i]
        f = self.files[fi]
        where = f"'{f.filename}' episode '{name}'"
        if name not in f:
            raise UserError(f"{where} is listed in hdf5_keys but not in the file.")
        group = f[name]
        data: dict[str, np.ndarray] = {}
        for (src, out) in self.proprio + [(s, f"action_{n}") for s, n in self.actions]:
            if src not in group:
                raise UserError(f"{where} has no '{src}'.")
            value = np.asarray(group[src][:], np.float32)
            data[out] = value.reshape(len(value), -1)
        for src, cam in self.cameras:
            if src not in group:
                raise UserError(f"{where} has no camera '{src}'.")
            data[f"image_{cam}"] = resize_frames(self._frames(group[src], where, src),
                                                 self.cfg.image_size)
        for key, value in data.items():
            if value.dtype.kind == "f" and not np.isfinite(value).all():
                step = int(np.flatnonzero(~np.isfinite(value.reshape(len(value), -1)).all(1))[0])
                raise UserError(f"{where}: '{key}' has a non-finite value at step {step}.")
        n = check_same_length(task, data, where)
        if name in self.lengths and int(self.lengths[name]) != n:
            raise UserError(f"{where} has {n} steps but epi_len_mapping says "
                            f"{self.lengths[name]}.")
        return Episode(data=data, task=task)

    @staticmethod
    def _frames(ds: Any, where: str, src: str) -> np.ndarray:
        if ds.dtype == np.uint8 and ds.ndim == 4 and ds.shape[-1] == 3:
            return ds[:]
        import imageio.v3 as iio

        try:  # one encoded image (JPEG/PNG bytes) per step
            frames = [iio.imread(buf if isinstance(buf, bytes) else np.asarray(buf, np.uint8)
                                 .tobytes()) for buf in ds[:]]
        except Exception as e:  # noqa: BLE001 - any decoder failure is the same sentence
            raise UserError(f"{where}: camera '{src}' could not be decoded "
                            f"({type(e).__name__}).") from None
        return np.stack([fr[..., :3] for fr in frames]).astype(np.uint8)

    def close(self) -> None:
        for f in self.files:
            f.close()
        self.files = []
