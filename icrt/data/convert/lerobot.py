"""LeRobot datasets (a local dataset directory, codebase v3.0 or v2.x) -> icrt episode store.

LeRobot's v3.0 layout (``LeRobotDataset.create`` / ``save_episode`` / ``finalize``)::

    meta/info.json          codebase_version, fps, robot_type, splits, chunks_size, the
                            data_path / video_path templates and features {key: {dtype, shape,
                            names}} (dtype "video", "image", "float32", "int64", "string", ...)
    meta/tasks.parquet      one row per task: task_index, the task's text as the (pandas) index
    meta/episodes/chunk-XXX/file-XXX.parquet
                            one row per episode: episode_index, tasks, length, data/chunk_index,
                            data/file_index, dataset_from_index, dataset_to_index, and per video
                            key videos/<key>/{chunk_index, file_index, from_timestamp, to_timestamp}
    data/chunk-XXX/file-XXX.parquet
                            the steps of several episodes: one column per feature (image
                            features as embedded PNG) plus timestamp, frame_index, episode_index,
                            index, task_index
    videos/<key>/chunk-XXX/file-XXX.mp4
                            several episodes one after another; a step's frame is the one shown at
                            the episode's from_timestamp + the step's timestamp

v2.0 / v2.1: ``meta/episodes.jsonl`` and ``meta/tasks.jsonl`` instead of the parquet files, one
parquet file and one mp4 per camera for each episode (the info.json templates, with
episode_chunk = episode_index // chunks_size), each video starting at 0 s.

What a converted store holds:

* ``observation.state`` as ``state``, every other float ``observation.<name>`` as ``<name>``
  (``--keys`` picks among these LeRobot names), ``action`` as ``action``;
* cameras ``observation.images.<camera>`` (video or image features) as ``image_<camera>``
  (uint8 (T, H, W, 3), ``--cameras`` names the ``<camera>`` part), decoded with PyAV one episode
  at a time: the reader seeks to the episode in the shared mp4 and stops after its last frame;
* the task of the episode's first step (its language instruction) as the task, info.json's fps;
* DAgger columns, as LeRobot-based DAgger collectors write them: a per-step ``source``
  (0 = the policy acted, 1 = a human), or ``intervention`` / ``is_intervention`` /
  ``complementary_info.is_intervention`` (1 = a human intervened), becomes the store key
  ``step_source`` (int8: 0 human, 1 policy; the reverse of LeRobot's coding), so training keeps
  the store's successful episodes and puts the loss on human steps only; the episode's source is
  1 when the policy acted at any step. Success is a nonzero per-step ``success`` column at some
  step, else an episode field ``success`` in the episode metadata, else true;
* info.json's splits other than ``train`` (``"val": "40:50"``) become the validation split.
"""

from __future__ import annotations

import io
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

VERSIONS = ("v2.0", "v2.1", "v3.0")
SOURCE_COLUMNS = ("source", "intervention", "is_intervention",
                  "complementary_info.is_intervention")  # nonzero: a human acted
CAMERA_PREFIX = "observation.images."


def store_name(key: str) -> str:
    """icrt's name of a LeRobot feature: observation.state -> state, .images.front -> front."""
    return key.removeprefix(CAMERA_PREFIX).removeprefix("observation.").replace(".", "_")


def _numpy(table: Any, key: str, where: str) -> np.ndarray:
    """A parquet column of scalars or (nested) fixed-length lists -> (rows, D) array."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if key not in table.column_names:
        raise UserError(f"{where} has no column '{key}'.")
    col = table.column(key).combine_chunks()
    n = len(col)
    while pa.types.is_list(col.type) or pa.types.is_large_list(col.type) \
            or pa.types.is_fixed_size_list(col.type):
        lengths = pc.list_value_length(col)
        if col.null_count or (n and pc.min_max(lengths)["min"] != pc.min_max(lengths)["max"]):
            raise UserError(f"{where}: column '{key}' has empty or ragged rows.")
        col = col.flatten()
    if col.null_count:
        raise UserError(f"{where}: column '{key}' has missing values.")
    values = col.to_numpy(zero_copy_only=False)
    if values.dtype.kind not in "fiub":
        raise UserError(f"{where}: column '{key}' holds {col.type}, not numbers.")
    return values.reshape(n, -1)


class LeRobotReader:
    def __init__(self, cfg: ConvertConfig) -> None:
        try:
            import av  # noqa: F401
            import pyarrow  # noqa: F401
        except ImportError as e:
            raise UserError(f"--format lerobot needs PyAV and pyarrow ({e.name} is missing): "
                            f"pip install 'icrt[convert]'.") from None
        self.cfg = cfg
        self.videos: dict[str, tuple[Path, Any]] = {}  # camera key -> (mp4, open container)
        self.cached: tuple[Any, Any] = (None, None)  # (file, row groups), rows last read
        root = Path(cfg.input)
        if not root.is_dir():
            raise UserError(f"LeRobot dataset directory '{root}' does not exist.")
        info_path = root / "meta" / "info.json"
        if not info_path.is_file():
            raise UserError(f"'{root}' is not a LeRobot dataset: it has no meta/info.json.")
        try:
            info = json.loads(info_path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"'{info_path}' is not valid JSON ({e}).") from None
        version = str(info.get("codebase_version")) if isinstance(info, dict) else None
        if version not in VERSIONS:
            raise UserError(f"'{info_path}': LeRobot codebase_version {version!r} is not "
                            f"supported (only {', '.join(VERSIONS)}; lerobot's converters update "
                            f"older datasets).")
        missing = [k for k in ("fps", "features", "data_path") if not info.get(k)]
        if missing:
            raise UserError(f"'{info_path}' lacks '{missing[0]}'.")
        self.root, self.info, self.v3 = root, info, version == "v3.0"
        self.features: dict[str, dict[str, Any]] = info["features"]
        self.fps = float(info["fps"])
        self.episodes = sorted(self._episode_rows(), key=lambda e: int(e["episode_index"]))
        self.tasks = self._task_rows()
        self.num_episodes = len(self.episodes)
        if "action" not in self.features:
            raise UserError(f"'{info_path}' has no 'action' feature.")
        cams, lowdim = [], []
        for key, ft in self.features.items():
            if ft.get("dtype") in ("video", "image"):
                cams.append(key)
            elif key.startswith("observation.") and str(ft.get("dtype")).startswith("float"):
                lowdim.append(key)
        where = f"'{root}'"
        self.lowdim = select_names(cfg.keys, lowdim, "--keys",
                                   f"{where}'s low-dim observation features", self.close)
        names = select_names(cfg.cameras, [store_name(k) for k in cams], "--cameras",
                             f"{where}'s cameras", self.close)
        self.cameras = [k for n in names for k in cams if store_name(k) == n]
        if cfg.render_cameras:
            raise UserError("--render-cameras needs recorded simulator states, which LeRobot "
                            "datasets do not have.")
        self.source_col = next((c for c in SOURCE_COLUMNS if c in self.features), None)
        self.success_col = "success" if "success" in self.features else None
        self.columns = ["action", *self.lowdim, *(k for k in self.cameras
                                                  if self.features[k]["dtype"] == "image")]
        self.columns += [c for c in ("timestamp", "task_index", "episode_index",
                                     self.source_col, self.success_col) if c in self.features]
        self.valid: set[int] = set()
        for split, span in (info.get("splits") or {}).items():
            if split != "train" and isinstance(span, str) and ":" in span:
                a, b = span.split(":", 1)
                self.valid.update(range(int(a), int(b)))

    # ---------------------------------------------------------------- metadata

    def _episode_rows(self) -> list[dict[str, Any]]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.v3:
            return self._jsonl(self.root / "meta" / "episodes.jsonl")
        files = sorted((self.root / "meta" / "episodes").glob("*/*.parquet"))
        if not files:
            raise UserError(f"'{self.root}' is not a LeRobot v3.0 dataset: it has no "
                            f"meta/episodes/*/*.parquet.")
        rows = []
        for f in files:
            try:
                names = pq.read_schema(f).names
                rows += pq.read_table(f, columns=[c for c in names if not c.startswith("stats/")]
                                      ).to_pylist()
            except (pa.ArrowException, OSError) as e:
                raise UserError(f"'{f}' is not a readable parquet file ({e}).") from None
        return rows

    def _task_rows(self) -> dict[int, str]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.v3:
            return {int(r["task_index"]): str(r["task"])
                    for r in self._jsonl(self.root / "meta" / "tasks.jsonl")}
        path = self.root / "meta" / "tasks.parquet"
        if not path.is_file():
            return {}
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"'{path}' is not a readable parquet file ({e}).") from None
        text = next((c for c in table.column_names if c != "task_index" and (
            pa.types.is_string(table.schema.field(c).type)
            or pa.types.is_large_string(table.schema.field(c).type))), None)
        if text is None or "task_index" not in table.column_names:
            raise UserError(f"'{path}' has no task_index and task text columns.")
        return dict(zip(table.column("task_index").to_pylist(), table.column(text).to_pylist(),
                        strict=True))

    def _jsonl(self, path: Path) -> list[dict[str, Any]]:
        if not path.is_file():
            raise UserError(f"'{self.root}' is not a LeRobot v2 dataset: it has no "
                            f"meta/{path.name}.")
        try:
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"'{path}' is not valid JSON lines ({e}).") from None

    def _path(self, template: str, ep: dict[str, Any], **keys: Any) -> Path:
        index = int(ep["episode_index"])
        try:
            return self.root / template.format(
                episode_index=index, episode_chunk=index // int(self.info.get("chunks_size", 1000)),
                **keys)
        except (KeyError, IndexError, ValueError) as e:
            raise UserError(f"'{self.root}' episode {index}: path template {template!r} of "
                            f"meta/info.json cannot be filled ({e}).") from None

    # ---------------------------------------------------------------- reader protocol

    def layout(self) -> Layout:
        size = self.cfg.image_size
        if self.cameras and size is None:
            ft = self.features[self.cameras[0]]
            names, shape = list(ft.get("names") or []), list(ft.get("shape") or [0])
            size = int(shape[names.index("height")] if "height" in names else
                       shape[0] if shape[-1] in (1, 3, 4) else shape[1])
        key_meta = {store_name(k): {"names": self.features[k]["names"]}
                    for k in ("action", *self.lowdim)
                    if isinstance(self.features[k].get("names"), (list, dict))}
        cams = [store_name(k) for k in self.cameras]
        return Layout(proprio_keys=[store_name(k) for k in self.lowdim], action_keys=["action"],
                      image_keys=[f"image_{c}" for c in cams],
                      env={"name": None, "cameras": cams, "image_size": size or 0,
                           "lerobot": {"path": str(self.root.resolve()),
                                       "codebase_version": self.info["codebase_version"],
                                       "robot_type": self.info.get("robot_type")}},
                      fps=self.fps, key_meta=key_meta, has_split=bool(self.valid))

    def is_valid(self, i: int) -> bool:
        return int(self.episodes[i]["episode_index"]) in self.valid

    def episode(self, i: int) -> Episode:
        ep = self.episodes[i]
        index = int(ep["episode_index"])
        path = self._path(self.info["data_path"], ep, chunk_index=ep.get("data/chunk_index"),
                          file_index=ep.get("data/file_index"))
        where = f"'{path}' episode {index}"
        rows = self._rows(path, index, where)
        n = rows.num_rows
        if n == 0 or int(ep.get("length", n)) != n:
            raise UserError(f"{where} has {n} rows but the episode metadata says "
                            f"{ep.get('length')} steps.")
        data: dict[str, np.ndarray] = {"action": _numpy(rows, "action", where).astype(np.float32)}
        for key in self.lowdim:
            data[store_name(key)] = _numpy(rows, key, where).astype(np.float32)
        for key, value in data.items():
            if not np.isfinite(value).all():
                step = int(np.flatnonzero(~np.isfinite(value).all(1))[0])
                raise UserError(f"{where}: '{key}' has a non-finite value at step {step}.")
        ts = (_numpy(rows, "timestamp", where)[:, 0].astype(np.float64)
              if "timestamp" in rows.column_names else np.arange(n) / self.fps)
        for key in self.cameras:
            frames = (self._images(rows, key, where) if self.features[key]["dtype"] == "image"
                      else self._video(ep, key, ts))
            data[f"image_{store_name(key)}"] = resize_frames(frames, self.cfg.image_size)
        source = 0
        if self.source_col:
            human = _numpy(rows, self.source_col, where)[:, 0] != 0
            data["step_source"] = np.where(human, 0, 1).astype(np.int8)
            source = int(not human.all())
        if self.success_col:
            success = bool(np.any(_numpy(rows, self.success_col, where) != 0))
        else:
            success = bool(ep.get("success", True))
        task_index = (int(_numpy(rows, "task_index", where)[0, 0])
                      if "task_index" in rows.column_names else None)
        task = self.tasks.get(task_index) or next(iter(ep.get("tasks") or []), None) \
            or self.root.name
        check_same_length(task, data, where)
        return Episode(data=data, task=str(task), success=success, source=source)

    def _rows(self, path: Path, index: int, where: str) -> Any:
        """The episode's rows of a data file (only the row groups that can hold it are read;
        the last read ones are kept, for files with one row group of many episodes)."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        if not path.is_file():
            raise UserError(f"{where}: the data file does not exist.")
        try:
            pf = pq.ParquetFile(path)
            md = pf.metadata
            cols = [j for j in range(md.num_columns) if md.schema.column(j).path == "episode_index"]
            groups = []
            for g in range(md.num_row_groups):
                stats = md.row_group(g).column(cols[0]).statistics if cols else None
                if stats is None or not stats.has_min_max or stats.min <= index <= stats.max:
                    groups.append(g)
            have = pf.schema_arrow.names
            missing = [c for c in self.columns if c not in have]
            if missing:
                raise UserError(f"{where} has no column '{missing[0]}'.")
            if self.cached[0] != (path, groups):
                self.cached = (None, None)
                self.cached = ((path, groups), pf.read_row_groups(groups, columns=self.columns))
            rows = self.cached[1]
            if "episode_index" in rows.column_names:
                rows = rows.filter(pc.equal(rows.column("episode_index"), index))
        except (pa.ArrowException, OSError) as e:
            raise UserError(f"{where}: the data file is not a readable parquet file "
                            f"({type(e).__name__}: {e}).") from None
        return rows

    def _images(self, rows: Any, key: str, where: str) -> np.ndarray:
        from PIL import Image

        frames = []
        for step, item in enumerate(rows.column(key).to_pylist()):
            try:
                blob = item.get("bytes") if isinstance(item, dict) else None
                src = io.BytesIO(blob) if blob else self.root / str(item["path"])
                with Image.open(src) as img:
                    frames.append(np.asarray(img.convert("RGB")))
            except Exception as e:  # noqa: BLE001 - any decoder failure is the same sentence
                raise UserError(f"{where}: image '{key}' at step {step} could not be decoded "
                                f"({type(e).__name__}).") from None
        if len({f.shape for f in frames}) != 1:
            raise UserError(f"{where}: the images of '{key}' do not all have one size.")
        return np.stack(frames)

    def _video(self, ep: dict[str, Any], key: str, ts: np.ndarray) -> np.ndarray:
        """The frames shown at the episode's from_timestamp + ``ts``: seek to the key frame
        before the first, decode until past the last."""
        import av

        index = int(ep["episode_index"])
        start = 0.0
        if self.v3:
            fields = [f"videos/{key}/{f}" for f in ("chunk_index", "file_index", "from_timestamp")]
            if any(ep.get(f) is None for f in fields):
                raise UserError(f"'{self.root}' episode {index}: the episode metadata has no "
                                f"'{fields[0]}' for camera '{key}'.")
            start = float(ep[fields[2]])
        path = self._path(self.info.get("video_path") or "", ep, video_key=key,
                          chunk_index=ep.get(f"videos/{key}/chunk_index"),
                          file_index=ep.get(f"videos/{key}/file_index"))
        where = f"'{path}' episode {index}"
        if not path.is_file():
            raise UserError(f"{where}: the video of camera '{key}' does not exist.")
        tol = 0.45 / self.fps  # a step's frame is the one nearest its time
        want = start + ts
        lo, hi = want[0] - tol, want[-1] + tol
        frames, times = [], []
        try:
            if key not in self.videos or self.videos[key][0] != path:
                self._close_video(key)
                self.videos[key] = (path, av.open(str(path)))
            container = self.videos[key][1]
            stream = container.streams.video[0]
            container.seek(max(0, int(lo / stream.time_base)), stream=stream, backward=True)
            for frame in container.decode(stream):
                if frame.time is None or frame.time < lo:
                    continue
                if frame.time > hi:
                    break
                frames.append(frame.to_ndarray(format="rgb24"))
                times.append(frame.time)
        except (av.FFmpegError, OSError, IndexError) as e:
            self._close_video(key)
            raise UserError(f"{where}: the video of camera '{key}' could not be decoded "
                            f"({type(e).__name__}).") from None
        if len(frames) != len(ts) or np.abs(np.asarray(times) - want).max() > tol:
            raise UserError(f"{where}: camera '{key}' has {len(frames)} frames between "
                            f"{max(lo, 0):.3f} s and {hi:.3f} s, but the parquet rows have "
                            f"{len(ts)} steps at {self.fps:g} fps.")
        return np.stack(frames)

    def _close_video(self, key: str) -> None:
        _, container = self.videos.pop(key, (None, None))
        if container is not None:
            container.close()

    def close(self) -> None:
        for key in list(self.videos):
            self._close_video(key)
        self.cached = (None, None)
