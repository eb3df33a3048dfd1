"""In-context training sequences: prompt trajectories followed by a query of the same task.

Sampling follows ICRT. Each epoch, episodes are grouped by task; every task's episodes are
shuffled (or resampled to the median count with ``rebalance_tasks``), each is repeated 1..N
times (``num_repeat_traj``), neighbours may swap (``shuffle_repeat_traj``), and the results are
laid end to end into one stream of steps. A training sequence is a window of ``seq_length``
consecutive steps of that stream; with ``task_barrier`` no window crosses from one task into the
next, so every trajectory in a window shows the same task. ``non_overlapping=k`` keeps every k-th
window start.

Inside a window, one trajectory end is picked at random (not the first, if there are several):
steps up to it are the *prompt*, steps after it the *query* (``prompt_mask``). Every step carries
the chunk of its next ``num_pred_steps`` actions as target, padded past the episode end and
marked invalid there (``action_mask``). With ``prompt_dropout`` a fraction of training windows
start at a trajectory's first step and are all query (no prompt before the first trajectory).

Each item is a dict of tensors (T = seq_length, K = num_pred_steps)::

    proprio        (T, P) float32   normalised low-dim observation
    image_<cam>    (T, H, W, 3) uint8 camera frames (normalised/augmented by the model), or
    feature_<cam>  (T, N, C) precomputed encoder tokens with ``use_cached_features``
    action         (T, A) float32   normalised action taken at each step (the action token)
    action_chunk   (T, K, A) float32 targets a_t .. a_{t+K-1}
    action_mask    (T, K) bool      False where the chunk runs past the episode end
    prompt_mask    (T,) bool        True for prompt steps
    weighted_step  (T,) bool        the first num_weighted_steps steps of each query trajectory
    loss_mask      (T,) bool        False on steps the policy acted on in a DAgger store
                                    (key ``step_source``), which stay in context without loss
    episode_start  (T,) bool        first step of a trajectory
    context_id     (T,) int64       only without prompts (``no_prompt``): the trajectory
                                    occurrence of each step; steps attend within their own
    task, episode  (T,) int64       task index (into ``dataset.tasks``) and episode index

Sampling is a pure function of (seed, epoch, index): call ``set_epoch`` together with the
sampler's, and results do not depend on DataLoader workers or ranks.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icrt.config import DatasetConfig, SharedConfig
from icrt.data.spec import DatasetSpec
from icrt.data.store import EpisodeStore, compute_stats
from icrt.data.codec import Codec, delta_from_data
from icrt.data.transforms import Normalizer, identity_stats, pool_stats
from icrt.errors import UserError
from icrt.fsutil import atomic_write_text

log = logging.getLogger(__name__)

# A store key of per-step sources (int8, (T,)): 0 a human/expert action, 1 the policy's own.
STEP_SOURCE = "step_source"
SOURCE_POLICY = 1


@dataclass(frozen=True)
class EpisodeRef:
    store: int  # index into the dataset's stores
    index: int  # episode index inside that store
    task: str
    length: int


@dataclass(frozen=True)
class _Plan:
    """One epoch's stream of trajectory occurrences and the window start points."""

    occ_episode: np.ndarray  # (O,) dataset episode index of each occurrence
    occ_start: np.ndarray  # (O,) first stream position
    occ_end: np.ndarray  # (O,) one past the last stream position
    starts: np.ndarray  # (W,) window start positions


def read_split_file(path: str | Path) -> dict[str, list[list]]:
    """A run's ``split.json`` ({"train": [[store, index], ...], "val": [...]}), validated."""
    path = Path(path)
    try:
        body = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"Split file '{path}' is unreadable ({e}); delete it to split the "
                        f"dataset again.") from None
    ok = isinstance(body, dict) and all(
        isinstance(body.get(name, []), list)
        and all(isinstance(r, list) and len(r) == 2 and isinstance(r[0], str)
                and isinstance(r[1], int) for r in body.get(name, []))
        for name in ("train", "val")
    )
    if not ok:
        raise UserError(f"Split file '{path}' is not a split of this version ({{'train': "
                        f"[[store, episode], ...], 'val': [...]}}); delete it to split again.")
    return body


def split_episodes(
    episodes: list[EpisodeRef], train_split: float, seed: int,
    fixed_valid: dict[int, set[int]] | None = None,
) -> dict[str, list[EpisodeRef]]:
    """Episode-level split, per task so every task is in the training split.

    ``fixed_valid`` maps a store index to the episodes its source declared for validation
    (a converted robomimic file's ``mask/valid``): such a store keeps that split as it is.
    """
    fixed_valid = fixed_valid or {}
    rng = np.random.default_rng([seed, 1234])
    out: dict[str, list[EpisodeRef]] = {"train": [], "val": []}
    for e in episodes:
        if e.store in fixed_valid:
            out["val" if e.index in fixed_valid[e.store] else "train"].append(e)
    episodes = [e for e in episodes if e.store not in fixed_valid]
    for task in sorted({e.task for e in episodes}):
        eps = [e for e in episodes if e.task == task]
        order = rng.permutation(len(eps))
        n_train = max(1, int(round(len(eps) * train_split)))
        out["train"] += [eps[i] for i in order[:n_train]]
        out["val"] += [eps[i] for i in order[n_train:]]
    return out


class SequenceDataset(torch.utils.data.Dataset):
    """Prompt + query windows over one or more episode stores (see the module docstring)."""

    def __init__(
        self,
        dataset_cfg: DatasetConfig,
        shared_cfg: SharedConfig,
        split: str = "train",
        split_file: str | Path | None = None,
        spec: DatasetSpec | None = None,
        use_cached_features: bool = False,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        self.cfg = dataset_cfg
        self.shared = shared_cfg
        self.split = split
        self.spec = spec or DatasetSpec.for_run(dataset_cfg)
        self.seq_length = shared_cfg.seq_length
        self.num_pred_steps = shared_cfg.num_pred_steps
        self.seed = shared_cfg.seed
        self.epoch = 0
        self.use_cached_features = use_cached_features
        stores = self.spec.open_stores()
        keys = (*self.spec.proprio_keys, *self.spec.action_keys, *self.spec.image_keys)
        key_meta = {k: stores[0].key_info(k) for k in keys}
        use_delta = shared_cfg.use_delta_action
        if use_delta is None:  # follow the data
            use_delta = delta_from_data(self.spec.proprio_keys, self.spec.action_keys,
                                        key_meta)[0]
        self.codec = Codec(self.spec.proprio_keys, self.spec.action_keys, key_meta,
                           shared_cfg.rot_6d, use_delta, camera_keys=self.spec.image_keys,
                           use_cached_features=use_cached_features)
        self._store_paths = [str(p) for p in self.spec.stores]
        self._store_ids = [st.store_id for st in stores]
        self._stores: list[EpisodeStore] | None = stores
        self._pid = os.getpid()

        all_eps = self._select_episodes(stores)
        if split_file is not None and Path(split_file).is_file():
            splits = self._read_split(split_file, all_eps)
        else:
            fixed = {si: set(int(i) for i in st.attrs["valid_episodes"])
                     for si, st in enumerate(stores) if "valid_episodes" in st.attrs}
            splits = split_episodes(all_eps, self.spec.train_split, self.seed, fixed)
        if dataset_cfg.min_demos > 1:  # ICRT's min_demos: drop tasks with too few episodes
            counts = {t: sum(e.task == t for e in splits["train"]) for t in
                      {e.task for e in all_eps}}
            few = sorted(t for t, n in counts.items() if n < dataset_cfg.min_demos)
            if few:
                log.info("leaving out %d task(s) with fewer than %d training episodes: %s",
                         len(few), dataset_cfg.min_demos, ", ".join(few))
                splits = {k: [e for e in v if e.task not in few] for k, v in splits.items()}
        self.splits = splits
        episodes = splits[split]
        if split == "train" and dataset_cfg.dataset_fraction < 1.0:
            episodes = self._fraction(episodes, dataset_cfg.dataset_fraction)
        if not episodes:
            raise UserError(
                f"The {split} split of '{self.spec.path}' has no episodes (train_split "
                f"{self.spec.train_split}, {len(all_eps)} usable episodes)."
            )
        self.episodes = episodes
        self.tasks = sorted({e.task for e in all_eps})
        self._task_index = np.array([self.tasks.index(e.task) for e in episodes], np.int64)
        self._ep_len = np.array([e.length for e in episodes], np.int64)
        self._ep_store = np.array([e.store for e in episodes], np.int64)

        self._load_lowdim(stores)
        self._frames = self._load_frames(stores)
        self._groups = self._group_episodes()
        self._plan_cache: tuple[int, _Plan] | None = None
        self._len = len(self._plan(0).starts)
        if self._len == 0:
            longest = max(
                sum(self._ep_len[i] for i in g) * self.cfg.num_repeat_traj for g in self._groups
            )
            raise UserError(
                f"--shared-cfg.seq-length {self.seq_length} is longer than the {split} data of "
                f"any task (at most ~{longest} steps) in '{self.spec.path}'; lower it or add "
                f"episodes."
            )

    # ------------------------------------------------------------------ episode selection

    def _select_episodes(self, stores: list[EpisodeStore]) -> list[EpisodeRef]:
        wanted = self.cfg.task_names or self.spec.task_names
        known = sorted({t for s in stores for t in s.tasks})
        if wanted:
            missing = [t for t in wanted if t not in known]
            if missing:
                import difflib

                close = difflib.get_close_matches(missing[0], known, n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                raise UserError(
                    f"Task(s) {', '.join(missing)} are not in '{self.spec.path}'{hint}; it has "
                    f"{', '.join(known)}."
                )
        eps = []
        for si, s in enumerate(stores):
            names, lengths = s.episode_task_names, s.episode_lengths
            dagger = STEP_SOURCE in s.keys
            kept = []
            for i in range(s.num_episodes):
                if wanted and names[i] not in wanted:
                    continue
                # a DAgger store trains on its successful episodes only (LeRobot's rule)
                if (dagger or not self.spec.include_failures) and not s.episode_success[i]:
                    continue
                if not self.cfg.min_episode_length <= lengths[i] <= (
                        self.cfg.max_episode_length or lengths[i]):
                    continue
                kept.append(EpisodeRef(si, i, names[i], int(lengths[i])))
            if self.split == "train":
                self._log_store(s, kept, dagger)
            eps += kept
        if not eps:
            raise UserError(
                f"'{self.spec.path}' has no usable episodes (tasks {list(wanted or known)}, "
                f"failures {'included' if self.spec.include_failures else 'excluded'})."
            )
        return eps

    @staticmethod
    def _log_store(store: EpisodeStore, kept: list[EpisodeRef], dagger: bool) -> None:
        steps = sum(e.length for e in kept)
        if not dagger:
            log.info("store %s: demonstrations, %d episodes / %d steps, every step supervised",
                     store.path, len(kept), steps)
            return
        source = store.load(STEP_SOURCE).reshape(-1)
        starts = store.episode_starts
        corrected = sum(int(np.sum(source[starts[e.index]:starts[e.index] + e.length]
                                   != SOURCE_POLICY)) for e in kept)
        log.info("store %s: DAgger dataset (per-step source), %d successful episodes of %d / "
                 "%d steps kept; loss on the %d corrected steps only", store.path, len(kept),
                 store.num_episodes, steps, corrected)

    @staticmethod
    def _fraction(episodes: list[EpisodeRef], fraction: float) -> list[EpisodeRef]:
        out = []
        for task in sorted({e.task for e in episodes}):
            eps = [e for e in episodes if e.task == task]
            out += eps[: max(1, int(np.ceil(len(eps) * fraction)))]
        return out

    def save_split(self, path: str | Path) -> None:
        """Write the episode-level train/val split ([store id, episode index] pairs) as JSON."""
        body = {
            name: [[self._store_ids[e.store], e.index] for e in eps]
            for name, eps in self.splits.items()
        }
        path = Path(path)
        atomic_write_text(path, json.dumps(body) + "\n")

    def _read_split(self, path: str | Path, all_eps: list[EpisodeRef]) -> dict[str, list]:
        body = read_split_file(path)
        by_key = {(self._store_ids[e.store], e.index): e for e in all_eps}
        # split files written before store ids name stores by the path given at training
        by_key.update({(self._store_paths[e.store], e.index): e for e in all_eps})
        out: dict[str, list[EpisodeRef]] = {}
        for name in ("train", "val"):
            refs = []
            for store, index in body.get(name, []):
                ref = by_key.get((store, int(index)))
                if ref is None:
                    raise UserError(
                        f"Split file '{path}' lists episode {index} of '{store}', which the "
                        f"dataset does not provide."
                    )
                refs.append(ref)
            out[name] = refs
        return out

    # ------------------------------------------------------------------ low-dim data

    def _key_vector(self, store: EpisodeStore, key: str) -> np.ndarray:
        x = store.load(key).astype(np.float32).reshape(store.num_steps, -1)
        bad = np.flatnonzero(~np.isfinite(x).all(1))
        if len(bad):  # stores written before writes were checked may hold NaN
            ep = int(np.searchsorted(store.episode_ends, bad[0], side="right"))
            raise UserError(f"Episode store '{store.path}' has a non-finite value (NaN or inf) "
                            f"in '{key}', episode {ep}; fix or drop that episode.")
        return self.codec.vector(key, x)

    def _key_stats(self, stores: list[EpisodeStore], key: str) -> dict[str, np.ndarray]:
        stats = pool_stats([(s.stats(key), s.num_steps) for s in stores])
        rot = stores[0].key_info(key).get("rotation")
        if not (self.shared.rot_6d and rot is not None):
            return stats
        # positions keep the store's statistics; the 6D part is already in [-1, 1]
        from icrt.data.transforms import ROTATION_SIZES

        start, size = int(rot["start"]), ROTATION_SIZES[rot["format"]]
        ident = identity_stats(6)
        return {
            k: np.concatenate([v[:start], ident[k], v[start + size :]]).astype(np.float32)
            for k, v in stats.items()
        }

    def _load_lowdim(self, stores: list[EpisodeStore]) -> None:
        spec = self.spec
        # (N, P) / (N, A): every store's rows, concatenated; episodes index into them
        store_row0 = np.cumsum([0] + [s.num_steps for s in stores])
        self._ep_row = np.array(
            [store_row0[e.store] + stores[e.store].episode_starts[e.index] for e in self.episodes],
            np.int64,
        )
        self._ep_store_row = np.array(
            [stores[e.store].episode_starts[e.index] for e in self.episodes], np.int64
        )

        def gather(keys: tuple[str, ...]) -> np.ndarray:
            if not keys:
                return np.zeros((int(store_row0[-1]), 0), np.float32)
            return np.concatenate(
                [np.concatenate([self._key_vector(s, k) for k in keys], axis=1) for s in stores]
            )

        proprio_raw = gather(spec.proprio_keys)
        action_raw = gather(spec.action_keys)
        self._moved = self._moved_objects(stores, proprio_raw)
        bad = [d for d in self.cfg.goal_dims if not 0 <= d < proprio_raw.shape[1]]
        if bad:
            raise UserError(f"--dataset-cfg.goal-dims {bad}: the low-dim vector has "
                            f"{proprio_raw.shape[1]} values.")
        # DAgger stores: steps the policy acted on stay in the context but carry no loss
        self._policy_step = np.concatenate([
            s.load(STEP_SOURCE).reshape(-1) == SOURCE_POLICY if STEP_SOURCE in s.keys
            else np.zeros(s.num_steps, bool) for s in stores])
        self.proprio_dim = proprio_raw.shape[1]
        self.action_dim = action_raw.shape[1]
        self.image_keys = spec.image_keys
        # camera key -> the store key read for it (precomputed encoder features if asked)
        self._frame_keys = {k: self.codec.frame_key(k) for k in spec.image_keys}

        def stats_of(keys: tuple[str, ...]) -> dict[str, np.ndarray]:
            if not keys:
                return identity_stats(0)
            parts = [self._key_stats(stores, k) for k in keys]
            return {n: np.concatenate([p[n] for p in parts]) for n in parts[0]}

        # action tokens carry absolute actions; with delta actions the predicted chunks are
        # relative to the current pose and get statistics of their own
        self._delta = self.codec.delta
        stats = {"proprio": stats_of(spec.proprio_keys), "action": stats_of(spec.action_keys)}
        modes = {"proprio": self.cfg.proprio_norm, "action": self.cfg.action_norm}
        if self._delta is not None:
            stats["action_target"] = self._delta_stats(proprio_raw, action_raw)
            modes["action_target"] = self.cfg.action_norm
        self.normalizer = self.codec.normalizer = Normalizer(
            stats=stats, modes=modes, min_spread={"proprio": self.cfg.proprio_min_spread})
        self._proprio = self.codec.encode_proprio(proprio_raw)
        self._action = self.codec.encode_actions(action_raw)
        if self._delta is not None:
            self._proprio_raw, self._action_raw = proprio_raw, action_raw
        self._proprio_noise = self.cfg.proprio_noise * self.normalizer.scale("proprio")
        self._action_noise = self.cfg.action_noise * self.normalizer.scale("action")

    def _moved_objects(self, stores: list[EpisodeStore], proprio_raw: np.ndarray) -> np.ndarray:
        """Per episode, the object slot (of --dataset-cfg.moved-object-slots in the last
        low-dim key) whose position travels furthest from its first step; -1 without labels."""
        n = self.cfg.moved_object_slots
        if not n:
            return np.full(len(self.episodes), -1, np.int64)
        flag = "--dataset-cfg.moved-object-slots"
        key = self.spec.proprio_keys[-1] if self.spec.proprio_keys else None
        size = int(np.prod(stores[0].key_info(key)["shape"])) if key else 0
        if not size or size % n:
            raise UserError(f"{flag} {n}: the last low-dim key {key!r} has {size} values, "
                            f"which do not split into {n} equal objects.")
        dims = list(self.cfg.object_pos_dims) or list(range(size // n))
        if max(dims) >= size // n or min(dims) < 0:
            raise UserError(f"--dataset-cfg.object-pos-dims {dims}: an object slot has "
                            f"{size // n} values.")
        objects = proprio_raw[:, proprio_raw.shape[1] - size:].reshape(-1, n, size // n)
        pos = objects[:, :, dims]  # (rows, n, d)
        out = np.empty(len(self.episodes), np.int64)
        for i, (row, length) in enumerate(zip(self._ep_row, self._ep_len, strict=True)):
            p = pos[row: row + length]
            out[i] = int(np.linalg.norm(p - p[:1], axis=-1).max(0).argmax())
        return out

    def _delta_stats(self, proprio_raw: np.ndarray, action_raw: np.ndarray) -> dict:
        rows = np.concatenate(
            [np.arange(r, r + n) for r, n in zip(self._ep_row, self._ep_len, strict=True)]
        )
        rows = rows[:: max(1, len(rows) // 20000)]
        chunks, _ = self._chunk_rows(rows, self._row_to_len(rows))
        delta = self.codec.to_delta(action_raw[chunks], proprio_raw[rows])
        return {k: np.asarray(v, np.float32) for k, v in
                compute_stats(delta.reshape(-1, delta.shape[-1])).items()}

    def _row_to_len(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For global rows of selected episodes: (step within episode, episode length)."""
        order = np.argsort(self._ep_row)
        ep = order[np.searchsorted(self._ep_row[order], rows, side="right") - 1]
        return rows - self._ep_row[ep], self._ep_len[ep]

    def _chunk_rows(self, rows: np.ndarray, t_and_len: tuple[np.ndarray, np.ndarray]):
        """Rows of the next K actions of each row (clamped to the episode) and their validity."""
        t, length = t_and_len
        tk = t[:, None] + np.arange(self.num_pred_steps)[None, :]  # (N, K)
        valid = tk < length[:, None]
        chunk = rows[:, None] - t[:, None] + np.minimum(tk, length[:, None] - 1)
        return chunk, valid

    # ------------------------------------------------------------------ epoch plans

    def _group_episodes(self) -> list[np.ndarray]:
        if not self.cfg.sort_by_lang:
            return [np.arange(len(self.episodes))]
        return [np.flatnonzero(self._task_index == t) for t in np.unique(self._task_index)]

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose stream items are drawn from (call with the sampler's)."""
        self.epoch = int(epoch)

    def _plan(self, epoch: int) -> _Plan:
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        cfg, T = self.cfg, self.seq_length
        rng = np.random.default_rng([self.seed, epoch, 0 if self.split == "train" else 1])
        rebalance = None
        if cfg.rebalance_tasks and cfg.sort_by_lang:
            rebalance = (
                int(np.median([len(g) for g in self._groups])) if self.split == "train" else 5
            )
        occ_episode, starts, offset = [], [], 0
        barrier = cfg.task_barrier and cfg.sort_by_lang
        for gi in rng.permutation(len(self._groups)):
            group = self._groups[gi]
            if rebalance is not None:
                n = rebalance
                if self.spec.task_ratios and self.split == "train":  # ICRT's task_grouping
                    task = self.tasks[self._task_index[group[0]]]
                    n = max(1, int(rebalance * self.spec.task_ratios.get(task, 1.0)))
                chosen = group[rng.choice(len(group), n, replace=len(group) < n)]
            else:
                chosen = group[rng.permutation(len(group))]
            repeats = rng.integers(1, cfg.num_repeat_traj + 1, size=len(chosen))
            occ = list(np.repeat(chosen, repeats))
            if cfg.shuffle_repeat_traj:
                for i in range(len(occ) - 1):
                    if rng.random() < 0.5:
                        occ[i], occ[i + 1] = occ[i + 1], occ[i]
            length = int(self._ep_len[occ].sum())
            if barrier:
                if length < T:
                    log.warning("task '%s' has %d steps (< seq_length %d) this epoch; skipped",
                                self.tasks[self._task_index[group[0]]], length, T)
                    continue
                starts.append(offset + np.arange(length - T + 1))
            occ_episode += occ
            offset += length
        occ_episode = np.asarray(occ_episode, np.int64)
        occ_end = np.cumsum(self._ep_len[occ_episode]) if len(occ_episode) else np.zeros(0)
        occ_start = occ_end - self._ep_len[occ_episode]
        if barrier:
            all_starts = np.concatenate(starts) if starts else np.zeros(0, np.int64)
        else:
            all_starts = np.arange(max(0, offset - T + 1))
        stride = cfg.non_overlapping
        stride = T if stride is True else max(1, int(stride))
        starts = all_starts[::stride].astype(np.int64)
        if self.spec.weights is not None and self.split == "train" and len(starts):
            starts = self._mixture(starts, occ_episode, occ_end, rng)
        plan = _Plan(occ_episode, occ_start, occ_end, starts)
        self._plan_cache = (epoch, plan)
        return plan

    def _mixture(self, starts: np.ndarray, occ_episode: np.ndarray, occ_end: np.ndarray,
                 rng: np.random.Generator) -> np.ndarray:
        """Resample the epoch's windows so the store of each window's query (its last step)
        follows the dataset JSON's store weights; the epoch keeps its number of windows."""
        last = np.searchsorted(occ_end, starts + self.seq_length - 1, side="right")
        store = self._ep_store[occ_episode[last]]
        weights = np.asarray(self.spec.weights, np.float64)
        present = [k for k in range(len(weights)) if np.any(store == k)]
        p = weights[present] / weights[present].sum()
        counts = rng.multinomial(len(starts), p)
        out = []
        for k, c in zip(present, counts, strict=True):
            pool = starts[store == k]
            out.append(pool[rng.choice(len(pool), c, replace=c > len(pool))])
        return np.sort(np.concatenate(out))

    # ------------------------------------------------------------------ items

    def __len__(self) -> int:
        return self._len

    def _store(self, i: int) -> EpisodeStore:
        if self._stores is None or self._pid != os.getpid():  # reopen inside each worker
            self._stores = [EpisodeStore.open(p) for p in self._store_paths]
            self._pid = os.getpid()
        return self._stores[i]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_stores"] = None  # zarr handles are reopened by each worker
        state["_pool"] = state["_pool_pid"] = None  # and so are reader threads
        return state

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self._sample(index)

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """A batch of windows (what a DataLoader asks for). The frames of every window are
        read straight into one (B, T, ...) tensor per key, which :func:`collate` hands on
        without stacking (a copy of every frame saved); read out of core with
        ``--dataset-cfg.read-threads`` > 1, the windows' chunk reads run in threads."""
        jobs: list | None = [] if self._frames is None else None
        batch = {key: self._batch_buffer(key, len(indices)) for key in self._frame_keys.values()}
        items = [self._sample(int(i), jobs, {k: v[j] for k, v in batch.items()})
                 for j, i in enumerate(indices)]
        pool = self._read_pool() if jobs else None
        if pool is None:
            for job in jobs or ():
                job()
        else:
            for future in [pool.submit(job) for job in jobs]:
                future.result()
        return items

    def _batch_buffer(self, key: str, n: int) -> torch.Tensor:
        """An uninitialised (n, T, ...) frame tensor; in a DataLoader worker in shared memory,
        so that handing the batch to the training process copies nothing."""
        if self._frames is not None:
            rows = self._frames[key][0]
            row_shape, dtype = rows.shape[1:], rows.dtype
        else:
            info = self._store(0).key_info(key)
            row_shape, dtype = tuple(info["shape"]), np.dtype(info["dtype"])
        shape = (n, self.seq_length, *row_shape)
        dtype = torch.from_numpy(np.empty(0, dtype)).dtype
        if torch.utils.data.get_worker_info() is None:
            return torch.empty(shape, dtype=dtype)
        elem = torch.empty(0, dtype=dtype)  # as default_collate allocates in a worker
        return elem.new(elem._typed_storage()._new_shared(int(np.prod(shape)))).view(shape)

    def _read_pool(self):
        """This process's reader threads (made after a DataLoader worker starts), or None."""
        n = self.cfg.read_threads or (1 if torch.utils.data.get_worker_info() else 2)
        if n <= 1:
            return None
        if getattr(self, "_pool_pid", None) != os.getpid():
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(n, thread_name_prefix="icrt-read")
            self._pool_pid = os.getpid()
        return self._pool

    def _sample(self, index: int, jobs: list | None = None,
                frames: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Window ``index``. Its frames go into ``frames`` (per key a (T, ...) tensor) when
        given, and are read by ``jobs`` (appended, to run later in any thread) when given."""
        if not 0 <= index < self._len:
            raise IndexError(index)
        plan = self._plan(self.epoch)
        n_windows = len(plan.starts)
        # epochs differ slightly in length (resampling); map the fixed index range onto them
        j = index if n_windows == self._len else index * n_windows // self._len
        s = int(plan.starts[j])
        T = self.seq_length
        no_prompt = not self.shared.prompt
        if (not no_prompt and self.cfg.prompt_dropout > 0 and self.split == "train"
                and np.random.default_rng([self.seed, self.epoch, index, 2]).random()
                < self.cfg.prompt_dropout):
            # prompt dropout: start at the first trajectory's first step, nothing before it
            s = int(plan.occ_start[np.searchsorted(plan.occ_end, s, side="right")])
            no_prompt = True
        pos = np.arange(s, s + T)
        occ = np.searchsorted(plan.occ_end, pos, side="right")  # (T,)
        ep = plan.occ_episode[occ]
        t = pos - plan.occ_start[occ]
        length = self._ep_len[ep]
        rows = self._ep_row[ep] + t
        rng = np.random.default_rng([self.seed, self.epoch, index, 1])

        proprio = self._proprio[rows]
        if self.cfg.proprio_noise > 0 and self.proprio_dim:
            proprio = proprio + rng.normal(size=proprio.shape) * self._proprio_noise
        action = self._action[rows]
        if self.cfg.action_noise > 0:
            action = action + rng.normal(size=action.shape) * self._action_noise
        chunk_rows, valid = self._chunk_rows(rows, (t, length))
        if self._delta is not None:
            chunk = self.codec.encode_chunk(self._action_raw[chunk_rows], self._proprio_raw[rows])
        else:
            chunk = self._action[chunk_rows]  # (T, K, A)

        if no_prompt:  # behaviour cloning or prompt dropout: every step is a query step
            prompt_mask = np.zeros(T, bool)
            n = self.cfg.num_weighted_steps
            weighted = t < (n if n >= 1 else n * length)
        else:
            prompt_mask, weighted = self._prompt_mask(np.flatnonzero(t == length - 1), rng)
        item = {
            "proprio": torch.from_numpy(np.asarray(proprio, np.float32)),
            "action": torch.from_numpy(np.asarray(action, np.float32)),
            "action_chunk": torch.from_numpy(np.ascontiguousarray(chunk, np.float32)),
            "action_mask": torch.from_numpy(valid),
            "prompt_mask": torch.from_numpy(prompt_mask),
            "weighted_step": torch.from_numpy(weighted),
            "loss_mask": torch.from_numpy(~self._policy_step[rows]),
            "episode_start": torch.from_numpy(t == 0),
            "task": torch.from_numpy(self._task_index[ep]),
            "episode": torch.from_numpy(ep),
        }
        if self.cfg.moved_object_slots:
            item["moved_object"] = torch.from_numpy(self._moved[ep])
        if self.cfg.goal_dims:  # where each step's trajectory ends (normalised)
            last = self._ep_row[ep] + self._ep_len[ep] - 1
            item["goal"] = torch.from_numpy(
                np.asarray(self._proprio[last][:, list(self.cfg.goal_dims)], np.float32))
        if not self.shared.prompt:  # each trajectory occurrence attends only to itself
            item["context_id"] = torch.from_numpy(occ - occ[0])
        for key in self._frame_keys.values():
            out = frames[key] if frames is not None else None
            rows = self._read_frames(key, occ, ep, t, jobs,
                                     None if out is None else out.numpy())
            item[key] = out if out is not None else torch.from_numpy(rows)
        return item

    def _prompt_mask(self, eos: np.ndarray, rng: np.random.Generator):
        """ICRT's split of a window into prompt and query at a random trajectory end."""
        T = self.seq_length
        prompt = np.ones(T, bool)
        weighted = np.zeros(T, bool)
        if len(eos) == 0:
            return prompt, weighted
        candidates = eos[1:] if len(eos) > 1 else eos
        cut = int(rng.choice(candidates))
        prompt[cut + 1 :] = False
        n = self.cfg.num_weighted_steps
        bounds = [*eos[eos >= cut], T - 1]
        for a, b in zip(bounds[:-1], bounds[1:], strict=False):  # each trajectory after the cut
            steps = int(n) if n >= 1 else int(n * (b - a))
            weighted[a + 1 : min(a + 1 + steps, b + 1)] = True
        return prompt, weighted

    def _load_frames(self, stores: list[EpisodeStore]) -> dict[str, list[np.ndarray]] | None:
        """Every frame key in memory if it fits ``image_cache_gb`` (zarr's per-read cost
        dominates window reads otherwise), else None (read window by window)."""
        keys = list(self._frame_keys.values())
        if not keys:
            return None
        total = 0
        for s in stores:
            for k in keys:
                info = s.key_info(k)
                row_bytes = int(np.prod(info["shape"])) * np.dtype(info["dtype"]).itemsize
                total += s.num_steps * row_bytes
        if total > self.cfg.image_cache_gb * 1e9:
            log.info("frames take %.1f GB > --dataset-cfg.image-cache-gb; reading from the "
                     "stores per window", total / 1e9)
            return None
        return {k: [s.load(k) for s in stores] for k in keys}

    def _read_frames(self, key: str, occ: np.ndarray, ep: np.ndarray, t: np.ndarray,
                     jobs: list | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """Frames of the window, read as one contiguous slice per trajectory occurrence
        straight into ``out`` (or a new array); out of core now, or by ``jobs`` if given."""
        change = np.flatnonzero(np.diff(occ)) + 1
        for a, b in zip([0, *change], [*change, len(occ)], strict=True):
            e = int(ep[a])
            ref = self.episodes[e]
            start = int(self._ep_store_row[e]) + int(t[a])
            stop = int(self._ep_store_row[e]) + int(t[b - 1]) + 1
            if self._frames is not None:
                rows = self._frames[key][ref.store][start:stop]
                if out is None:
                    out = np.empty((len(occ), *rows.shape[1:]), rows.dtype)
                out[a:b] = rows
            else:
                store = self._store(ref.store)
                if out is None:
                    info = store.key_info(key)
                    out = np.empty((len(occ), *info["shape"]), info["dtype"])
                if jobs is None:
                    store.read(key, start, stop, out=out[a:b])
                else:  # the disk starts on every window of the batch before any is read
                    store.prefetch(key, start, stop)
                    jobs.append(lambda s=store, o=out[a:b], r=(start, stop): s.read(key, *r,
                                                                                   out=o))
        return out


def collate(items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``default_collate`` for windows, except that a key whose tensors are already the
    consecutive rows of one batch tensor (the frames :meth:`SequenceDataset.__getitems__`
    reads) is returned as that tensor instead of stacked into a copy."""
    from torch.utils.data import default_collate

    out = {}
    for key in items[0]:
        rows = [item[key] for item in items]
        whole = _rows_of_one_tensor(rows)
        out[key] = whole if whole is not None else default_collate(rows)
    return out


def _rows_of_one_tensor(rows: list[torch.Tensor]) -> torch.Tensor | None:
    """The (len(rows), ...) tensor whose storage holds exactly ``rows``, one after another,
    or None."""
    first = rows[0]
    n = first.numel()
    storage = first.untyped_storage()
    if (not n or not first.is_contiguous()
            or storage.nbytes() != len(rows) * n * first.element_size()):
        return None
    for i, t in enumerate(rows):
        if (t.untyped_storage().data_ptr() != storage.data_ptr() or t.dtype != first.dtype
                or t.shape != first.shape or not t.is_contiguous()
                or t.storage_offset() != i * n):
            return None
    return first.as_strided((len(rows), *first.shape), (n, *first.stride()), 0)
