"""The dataset JSON (``--dataset-cfg.dataset-json``): which stores and keys a run trains on.

    {
      "stores": ["mw5.zarr"],              # paths relative to this file (or absolute), or
                                           # {"path": "a.zarr", "weight": 0.7} objects
      "proprio_keys": ["state"],           # low-dim observation keys, concatenated
      "action_keys": ["action"],           # action keys, concatenated
      "image_keys": [],                    # camera keys, e.g. ["image_agentview"]; without
                                           # the field, the stores' camera keys are used
      "train_split": 0.9,                  # fraction of each task's episodes used for training
      "task_names": null,                  # optional task filter
      "include_failures": false            # train on episodes flagged unsuccessful too
    }

Several stores merge into one dataset; tasks with the same name are the same task. A store
listed with a ``weight`` is a mixture component: the weights (normalised) are the probabilities
that a training sequence's query comes from each store, whatever the stores' sizes.

A run's inputs are :meth:`DatasetSpec.for_run`: the JSON's keys, or the keys named by
``--dataset-cfg.input-sensors`` (:func:`select_sensors`).
"""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from icrt.data.store import EpisodeStore
from icrt.errors import UserError
from icrt.fsutil import atomic_write_text

log = logging.getLogger(__name__)

_FIELDS = {
    "stores",
    "proprio_keys",
    "action_keys",
    "image_keys",
    "train_split",
    "task_names",
    "include_failures",
    "description",
    "task_grouping",
}


@dataclass(frozen=True)
class DatasetSpec:
    path: Path
    stores: tuple[Path, ...]
    proprio_keys: tuple[str, ...]
    action_keys: tuple[str, ...]
    image_keys: tuple[str, ...] = ()
    train_split: float = 0.9
    task_names: tuple[str, ...] | None = None
    include_failures: bool = False
    # per-store sampling weights (None: sequences in proportion to each store's data)
    weights: tuple[float, ...] | None = None
    # ICRT's task_grouping: task -> factor on its episodes per epoch (None: all equal)
    task_ratios: dict[str, float] | None = None
    # False when the JSON has no image_keys field: the stores' cameras are then used
    image_keys_listed: bool = True

    @classmethod
    def load(cls, path: str | Path) -> DatasetSpec:
        """Read and validate a dataset JSON; every problem is one sentence naming the file.
        Several comma-separated JSONs (``a.json,b.json``, as LeRobot's ``--repo-ids a,b``)
        combine into one dataset: their stores are merged (with their weights, if every file
        gives them) and keys, split and failure setting must agree."""
        if isinstance(path, str) and "," in path:
            return cls._combine([cls.load(p.strip()) for p in path.split(",") if p.strip()])
        path = Path(path)
        if not path.is_file():
            raise UserError(
                f"Dataset JSON '{path}' does not exist (make one with scripts/collect.py or see "
                f"config/dataset/)."
            )
        try:
            d: dict[str, Any] = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"Dataset JSON '{path}' is not valid JSON: {e}.") from None
        if not isinstance(d, dict):
            raise UserError(f"Dataset JSON '{path}' must hold an object.")
        if "hdf5_keys" in d or "dataset_path" in d:
            return cls.load(icrt_dataset_json(path))
        unknown = sorted(set(d) - _FIELDS)
        if unknown:
            raise UserError(
                f"Dataset JSON '{path}' has unknown field(s) {', '.join(unknown)}; known fields "
                f"are {', '.join(sorted(_FIELDS))}."
            )
        entries = d.get("stores")
        weights: list[float | None] = []
        if isinstance(entries, list):
            paths = []
            for e in entries:
                if isinstance(e, dict):
                    w = e.get("weight")
                    bad_w = w is not None and (isinstance(w, bool) or not isinstance(
                        w, (int, float)) or not w > 0)
                    if not isinstance(e.get("path"), str) or set(e) - {"path", "weight"} or bad_w:
                        raise UserError(
                            f"Dataset JSON '{path}': a store entry must be a path or "
                            f'{{"path": ..., "weight": W > 0}}, got {json.dumps(e)}.')
                    paths.append(e["path"])
                    weights.append(None if w is None else float(w))
                else:
                    paths.append(e)
                    weights.append(None)
            d["stores"] = paths
        if any(w is not None for w in weights) and any(w is None for w in weights):
            raise UserError(f"Dataset JSON '{path}': give every store a weight, or none.")
        for name in ("stores", "proprio_keys", "action_keys", "image_keys", "task_names"):
            value = d.get(name)
            if value is not None and not (
                isinstance(value, list) and all(isinstance(v, str) for v in value)
            ):
                raise UserError(
                    f"Dataset JSON '{path}': '{name}' must be a list of strings, got "
                    f"{json.dumps(value)}."
                )
        for name in ("stores", "action_keys"):  # inputs are checked by select_sensors
            if not d.get(name):
                raise UserError(f"Dataset JSON '{path}' needs a non-empty list '{name}'.")
        if not isinstance(d.get("include_failures", False), bool):
            raise UserError(f"Dataset JSON '{path}': 'include_failures' must be true or false.")
        split = d.get("train_split", 0.9)
        if isinstance(split, bool) or not isinstance(split, (int, float)) or not 0.0 < split <= 1.0:
            raise UserError(f"Dataset JSON '{path}': train_split must be in (0, 1], got {split!r}.")
        stores = tuple(
            (p if p.is_absolute() else path.parent / p) for p in (Path(s) for s in d["stores"])
        )
        for s in stores:
            if not s.exists():
                raise UserError(f"Dataset JSON '{path}' lists store '{s}', which does not exist.")
        tasks = d.get("task_names")
        ratios = None
        if d.get("task_grouping"):
            ratios = _task_ratios(path, d["task_grouping"])
        return cls(
            path=path,
            stores=stores,
            proprio_keys=tuple(d.get("proprio_keys") or ()),
            action_keys=tuple(d["action_keys"]),
            image_keys=tuple(d.get("image_keys") or ()),
            train_split=float(split),
            task_names=tuple(tasks) if tasks else None,
            include_failures=bool(d.get("include_failures", False)),
            weights=tuple(float(w) for w in weights if w is not None) or None,
            task_ratios=ratios,
            image_keys_listed="image_keys" in d,
        )

    @classmethod
    def for_run(cls, dataset_cfg: Any) -> DatasetSpec:
        """The dataset a run trains on: ``dataset_cfg.dataset_json`` with the input keys of
        ``dataset_cfg.input_sensors`` (a :class:`~icrt.config.DatasetConfig`) applied."""
        return select_sensors(cls.load(dataset_cfg.dataset_json),
                              getattr(dataset_cfg, "input_sensors", None))

    @classmethod
    def _combine(cls, specs: list[DatasetSpec]) -> DatasetSpec:
        first = specs[0]
        for other in specs[1:]:
            for name in ("proprio_keys", "action_keys", "image_keys", "train_split",
                         "include_failures"):
                if getattr(other, name) != getattr(first, name):
                    raise UserError(
                        f"Dataset JSONs '{first.path}' and '{other.path}' differ in {name} "
                        f"({getattr(first, name)} vs {getattr(other, name)}); only datasets of "
                        f"the same layout combine."
                    )
        weighted = [s.weights is not None for s in specs]
        if any(weighted) and not all(weighted):
            raise UserError("Combine dataset JSONs that all give store weights, or none do.")
        tasks = [s.task_names for s in specs]
        return cls(
            path=first.path,
            stores=tuple(p for s in specs for p in s.stores),
            proprio_keys=first.proprio_keys, action_keys=first.action_keys,
            image_keys=first.image_keys, train_split=first.train_split,
            task_names=None if any(t is None for t in tasks)
            else tuple(dict.fromkeys(t for ts in tasks for t in ts)),  # type: ignore[union-attr]
            include_failures=first.include_failures,
            weights=tuple(w for s in specs for w in s.weights) if all(weighted) else None,
            task_ratios={t: r for s in specs for t, r in (s.task_ratios or {}).items()} or None,
            image_keys_listed=any(s.image_keys_listed for s in specs),
        )

    def open_stores(self) -> list[EpisodeStore]:
        """Open every store and check that each has the listed keys with matching shapes."""
        stores = [EpisodeStore.open(p) for p in self.stores]
        for key in (*self.proprio_keys, *self.action_keys, *self.image_keys):
            infos = [s.key_info(key) for s in stores]  # raises naming store and key
            shapes = {tuple(i["shape"]) for i in infos}
            if len(shapes) > 1:
                raise UserError(
                    f"Key '{key}' has different shapes across the stores of '{self.path}': "
                    f"{sorted(shapes)}."
                )
            rotations = {json.dumps(i.get("rotation"), sort_keys=True) for i in infos}
            if len(rotations) > 1:
                raise UserError(
                    f"Key '{key}' declares different rotations across the stores of '{self.path}'."
                )
        return stores


def select_sensors(spec: DatasetSpec, input_sensors: Sequence[str] | None = None) -> DatasetSpec:
    """``spec`` with the observation keys that feed the policy decided.

    ``input_sensors`` (``--dataset-cfg.input-sensors``) replaces the JSON's ``proprio_keys`` and
    ``image_keys``: each key is a camera when the stores hold it as images (``image_*``, uint8
    H x W x 3) and a low-dim input otherwise, in the order given. Without it the JSON's keys
    stay, and a JSON without an ``image_keys`` field gets the cameras every store holds (an
    explicit ``"image_keys": []`` means none). Every problem is one sentence."""
    stores = [EpisodeStore.open(p) for p in spec.stores]
    flag = "--dataset-cfg.input-sensors"
    if input_sensors is None:
        if spec.image_keys_listed or spec.image_keys:
            cameras: tuple[str, ...] = spec.image_keys
        else:
            cameras = tuple(k for k in stores[0].keys if _is_camera(stores[0], k)
                            and all(k in s.keys and _is_camera(s, k) for s in stores[1:]))
            if cameras:
                log.info("dataset '%s' has no image_keys field: using the stores' cameras %s "
                         "(\"image_keys\": [] for none, or %s to choose)", spec.path,
                         ", ".join(cameras), flag)
        out = replace(spec, image_keys=cameras, image_keys_listed=True)
    else:
        lowdim, cameras_l = [], []
        for key in input_sensors:
            for store in stores:
                if key not in store.keys:
                    close = ([f"image_{key}"] if f"image_{key}" in store.keys  # a camera name
                             else difflib.get_close_matches(key, store.keys, n=1, cutoff=0.6))
                    hint = f" (did you mean '{close[0]}'?)" if close else ""
                    raise UserError(
                        f"Input sensor '{key}' ({flag}) is not a key of store '{store.path}'"
                        f"{hint}; it has {', '.join(store.keys)}.")
            info = stores[0].key_info(key)
            if key in spec.action_keys or info["kind"] == "action":
                raise UserError(
                    f"'{key}' is an action key of '{spec.path}', not a sensor; {flag} names "
                    f"the observation keys the policy sees (low-dim keys and cameras).")
            if info["kind"] == "feature":
                camera = "image_" + key.removeprefix("feature_")
                raise UserError(
                    f"'{key}' holds cached image features; name the camera '{camera}' in {flag} "
                    f"and add --model-cfg.vision-encoder-cfg.use-cached-features to train on "
                    f"its features.")
            (cameras_l if _is_camera(stores[0], key) else lowdim).append(key)
        out = replace(spec, proprio_keys=tuple(lowdim), image_keys=tuple(cameras_l),
                      image_keys_listed=True)
        log.info("input sensors (%s): low-dim %s, cameras %s", flag,
                 ", ".join(lowdim) or "none", ", ".join(cameras_l) or "none")
    if not out.proprio_keys and not out.image_keys:
        raise UserError(
            f"Dataset '{spec.path}' gives the policy no input: list low-dim keys in "
            f"'proprio_keys' or cameras in 'image_keys', or name them with {flag}.")
    return out


def _is_camera(store: EpisodeStore, key: str) -> bool:
    """A camera: frames the store keeps as images (``image_<camera>``)."""
    return store.key_info(key)["kind"] == "image"


def _task_ratios(path: Path, grouping: Any) -> dict[str, float]:
    """ICRT's task_grouping file ({"tasks": {group: [task, ...]}, "ratios": {group: r}}) as a
    factor per task on the episodes it contributes per epoch: the group's ratio, or without
    ratios the mean group size over its own (every group then weighs the same)."""
    if not isinstance(grouping, str):
        raise UserError(f"Dataset JSON '{path}': task_grouping must be a file path.")
    file = Path(grouping)
    file = file if file.is_absolute() else path.parent / file
    try:
        body = json.loads(file.read_text())
        groups = {str(g): list(ts) for g, ts in body["tasks"].items()}
        ratios = body.get("ratios")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            AttributeError) as e:
        raise UserError(f"task_grouping file '{file}' (named in '{path}') is unreadable or "
                        f"lacks {{\"tasks\": {{group: [tasks]}}}} ({type(e).__name__}).") from None
    mean = sum(len(v) for v in groups.values()) / max(1, len(groups))
    out: dict[str, float] = {}
    for g, ts in groups.items():
        if ratios is not None and g not in ratios:
            raise UserError(f"task_grouping file '{file}' gives no ratio for group '{g}'.")
        factor = float(ratios[g]) if ratios is not None else mean / max(1, len(ts))
        for t in ts:
            out[t] = factor
    return out


def icrt_dataset_json(path: str | Path, poll_seconds: float = 2.0,
                      timeout_seconds: float = 3600.0) -> Path:
    """An ICRT dataset JSON (HDF5 files + key lists) as our dataset JSON: converted once into
    ``NAME.icrt.zarr`` beside it (``scripts/convert.py --format icrt``), reused afterwards, and
    continued if an earlier conversion was interrupted. Under torchrun only rank 0 converts;
    the other ranks wait for it to finish."""
    import logging
    import os
    import time

    from icrt.config import ConvertConfig
    from icrt.data.convert import convert

    path = Path(path)
    out = path.with_name(f"{path.stem}.icrt.zarr")

    def complete() -> bool:
        try:
            return bool(EpisodeStore.open(out, check=False).attrs.get("convert_complete"))
        except UserError:
            return False

    if complete():
        return out.with_suffix(".json")
    if int(os.environ.get("RANK", "0")) != 0:
        deadline = time.monotonic() + timeout_seconds
        while not complete():
            if time.monotonic() > deadline:
                raise UserError(f"Rank {os.environ['RANK']} waited {timeout_seconds:.0f} s for "
                                f"rank 0 to convert '{path}' into '{out}'.")
            time.sleep(poll_seconds)
        return out.with_suffix(".json")
    logging.getLogger(__name__).warning(
        "'%s' is an ICRT dataset config: converting it once into '%s' (later runs reuse it)",
        path, out)
    convert(ConvertConfig(format="icrt", input=str(path), out=str(out), resume=out.exists()))
    return out.with_suffix(".json")


def write_dataset_json(path: str | Path, **fields: Any) -> None:
    """Write a dataset JSON (store paths are made relative to its folder when possible)."""
    path = Path(path)
    stores = []
    for s in fields.pop("stores"):
        s = Path(s)
        try:
            stores.append(str(s.resolve().relative_to(path.parent.resolve())))
        except ValueError:
            stores.append(str(s.resolve()))
    body = {"stores": stores, **fields}
    unknown = set(body) - _FIELDS
    if unknown:
        raise ValueError(f"unknown dataset JSON fields {sorted(unknown)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(body, indent=2) + "\n")
