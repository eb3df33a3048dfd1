"""Array transforms shared by training and inference: 6D rotations, delta actions, normalisation.

A key whose vector holds a rotation declares it in the store's key metadata, e.g.
``{"rotation": {"start": 3, "format": "quat_xyzw"}}``; with ``--shared-cfg.rot-6d`` that part is
replaced by the first two rows of the rotation matrix (continuous, unlike quaternions/Euler).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.spatial.transform import Rotation

ROTATION_SIZES = {"quat_xyzw": 4, "quat_wxyz": 4, "euler_xyz": 3, "axis_angle": 3, "rot6d": 6}


def _check_spec(spec: dict[str, Any], dim: int) -> tuple[int, int, str]:
    fmt = spec["format"]
    if fmt not in ROTATION_SIZES:
        raise ValueError(f"unknown rotation format {fmt!r}; known: {sorted(ROTATION_SIZES)}")
    start, size = int(spec["start"]), ROTATION_SIZES[fmt]
    if start < 0 or start + size > dim:
        raise ValueError(f"rotation {fmt} at {start} does not fit a vector of size {dim}")
    return start, size, fmt


def _to_rotation(r: np.ndarray, fmt: str) -> Rotation:
    if fmt == "quat_xyzw":
        return Rotation.from_quat(r)
    if fmt == "quat_wxyz":
        return Rotation.from_quat(r[:, [1, 2, 3, 0]])
    if fmt == "euler_xyz":
        return Rotation.from_euler("xyz", r)
    if fmt == "axis_angle":
        return Rotation.from_rotvec(r)
    return Rotation.from_matrix(rot6d_to_matrix(r))


def _from_rotation(rot: Rotation, fmt: str) -> np.ndarray:
    if fmt == "quat_xyzw":
        return rot.as_quat()
    if fmt == "quat_wxyz":
        return rot.as_quat()[:, [3, 0, 1, 2]]
    if fmt == "euler_xyz":
        return rot.as_euler("xyz")
    if fmt == "axis_angle":
        return rot.as_rotvec()
    return matrix_to_rot6d(rot.as_matrix())


def matrix_to_rot6d(m: np.ndarray) -> np.ndarray:
    """(N, 3, 3) -> (N, 6): the first two rows."""
    return m[:, :2, :].reshape(-1, 6)


def rot6d_to_matrix(r6: np.ndarray) -> np.ndarray:
    """(N, 6) -> (N, 3, 3) by Gram-Schmidt, so network outputs need not be orthonormal."""
    a, b = r6[:, :3], r6[:, 3:6]
    x = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-8)
    b = b - np.sum(x * b, axis=-1, keepdims=True) * x
    y = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-8)
    z = np.cross(x, y)
    return np.stack([x, y, z], axis=1)


def rotation_to_6d(x: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Replace the declared rotation part of rows ``x`` (N, D) by its 6D form."""
    start, size, fmt = _check_spec(spec, x.shape[-1])
    if fmt == "rot6d":
        return x
    rot = _to_rotation(x[:, start : start + size].astype(np.float64), fmt)
    r6 = matrix_to_rot6d(rot.as_matrix()).astype(x.dtype)
    return np.concatenate([x[:, :start], r6, x[:, start + size :]], axis=-1)


def rotation_from_6d(x: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Inverse of :func:`rotation_to_6d` (rows carry 6D where the spec's rotation was)."""
    start, _size, fmt = int(spec["start"]), ROTATION_SIZES[spec["format"]], spec["format"]
    if fmt == "rot6d":
        return x
    rot = Rotation.from_matrix(rot6d_to_matrix(x[:, start : start + 6].astype(np.float64)))
    r = _from_rotation(rot, fmt).astype(x.dtype)
    return np.concatenate([x[:, :start], r, x[:, start + 6 :]], axis=-1)


def rotated_dim(dim: int, spec: dict[str, Any] | None) -> int:
    """Vector size after :func:`rotation_to_6d`."""
    if spec is None:
        return dim
    return dim - ROTATION_SIZES[spec["format"]] + 6


# --------------------------------------------------------------------------- delta actions


def to_delta_action(
    action: np.ndarray, current: np.ndarray, pos_dims: int, rot6d_start: int | None
) -> np.ndarray:
    """Express absolute pose targets relative to the current pose (ICRT's delta actions).

    ``action`` (N, A) and ``current`` (N, P) hold a position in their first ``pos_dims`` entries
    and, if ``rot6d_start`` is given, a 6D rotation at that index of both. Translation is
    rotated into the current end-effector frame and rotation becomes R_cur^T R_target; the
    remaining action entries (e.g. the gripper) stay absolute.
    """
    out = action.copy()
    dp = action[:, :pos_dims] - current[:, :pos_dims]
    if rot6d_start is None:
        out[:, :pos_dims] = dp
        return out
    s = rot6d_start
    r_cur = rot6d_to_matrix(current[:, s : s + 6].astype(np.float64))
    r_tgt = rot6d_to_matrix(action[:, s : s + 6].astype(np.float64))
    out[:, :pos_dims] = np.einsum("nji,nj->ni", r_cur, dp)  # R_cur^T dp
    out[:, s : s + 6] = matrix_to_rot6d(np.einsum("nji,njk->nik", r_cur, r_tgt))
    return out


def from_delta_action(
    delta: np.ndarray, current: np.ndarray, pos_dims: int, rot6d_start: int | None
) -> np.ndarray:
    """Inverse of :func:`to_delta_action`."""
    out = delta.copy()
    if rot6d_start is None:
        out[:, :pos_dims] = delta[:, :pos_dims] + current[:, :pos_dims]
        return out
    s = rot6d_start
    r_cur = rot6d_to_matrix(current[:, s : s + 6].astype(np.float64))
    r_del = rot6d_to_matrix(delta[:, s : s + 6].astype(np.float64))
    out[:, :pos_dims] = np.einsum("nij,nj->ni", r_cur, delta[:, :pos_dims]) + current[:, :pos_dims]
    out[:, s : s + 6] = matrix_to_rot6d(np.einsum("nij,njk->nik", r_cur, r_del))
    return out


# --------------------------------------------------------------------------- normalisation


def identity_stats(dim: int) -> dict[str, np.ndarray]:
    """Statistics that make every normalisation mode the identity (used for 6D rotations)."""
    return {
        "mean": np.zeros(dim, np.float32),
        "std": np.ones(dim, np.float32),
        "min": -np.ones(dim, np.float32),
        "max": np.ones(dim, np.float32),
        "q01": -np.ones(dim, np.float32),
        "q99": np.ones(dim, np.float32),
    }


def pool_stats(parts: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    """Merge per-store statistics weighted by row counts.

    Mean and std are exact; min/max exact; quantiles are the count-weighted average of the
    stores' quantiles (an approximation documented in docs/data.md).
    """
    if len(parts) == 1:
        return {k: np.asarray(v, np.float32) for k, v in parts[0][0].items()}
    n = np.array([c for _, c in parts], np.float64)
    w = n / n.sum()
    stats = [s for s, _ in parts]

    def avg(name: str) -> np.ndarray:
        return sum(wi * np.asarray(s[name], np.float64) for s, wi in zip(stats, w, strict=True))

    mean = avg("mean")
    second = sum(
        wi * (np.asarray(s["std"], np.float64) ** 2 + np.asarray(s["mean"], np.float64) ** 2)
        for (s, _), wi in zip(parts, w, strict=False)
    )
    out = {
        "mean": mean,
        "std": np.sqrt(np.maximum(second - mean**2, 0.0)),
        "min": np.min([s["min"] for s, _ in parts], axis=0),
        "max": np.max([s["max"] for s, _ in parts], axis=0),
        "q01": avg("q01"),
        "q99": avg("q99"),
    }
    return {k: np.asarray(v, np.float32) for k, v in out.items()}


@dataclass
class Normalizer:
    """Affine per-dimension normalisation of batch keys (``proprio``, ``action``).

    mean_std: (x - mean) / std;  min_max and q01_q99: map [lo, hi] to [-1, 1];  none: identity.
    Dimensions with (near) zero spread are centred but not scaled. ``min_spread`` (per key) is a
    floor on the spread of the others: a dimension that barely moves in the data (the tilt of an
    object resting in a bin) is then not magnified into a huge input when it moves at test time.
    """

    stats: dict[str, dict[str, np.ndarray]]
    modes: dict[str, str]
    min_spread: dict[str, float] = field(default_factory=dict)
    _affine: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for key, mode in self.modes.items():
            s = {k: np.asarray(v, np.float32) for k, v in self.stats[key].items()}
            self.stats[key] = s
            if mode == "mean_std":
                centre, spread = s["mean"], s["std"]
            elif mode in ("min_max", "q01_q99"):
                lo, hi = (s["min"], s["max"]) if mode == "min_max" else (s["q01"], s["q99"])
                centre, spread = (hi + lo) / 2, (hi - lo) / 2
            elif mode == "none":
                centre, spread = np.zeros_like(s["mean"]), np.ones_like(s["mean"])
            else:
                raise ValueError(f"unknown normalisation mode {mode!r}")
            floor = max(float(self.min_spread.get(key, 0.0)), 1e-6)
            scale = np.where(spread > 1e-6, 1.0 / np.maximum(spread, floor), 1.0)
            self._affine[key] = (scale.astype(np.float32), centre.astype(np.float32))

    @property
    def target_key(self) -> str:
        """The entry that normalises predicted action chunks: ``action_target`` when they differ
        from the action tokens (delta actions), else ``action``. Checkpoints written before the
        two were separated normalise both with ``action``, as they were trained."""
        return "action_target" if "action_target" in self.modes else "action"

    def scale(self, key: str) -> np.ndarray:
        """d(normalised)/d(raw) per dimension (to express raw-unit noise in normalised units)."""
        return self._affine[key][0]

    def normalize(self, key: str, x: np.ndarray) -> np.ndarray:
        scale, centre = self._affine[key]
        return ((x - centre) * scale).astype(np.float32)

    def unnormalize(self, key: str, x: np.ndarray) -> np.ndarray:
        scale, centre = self._affine[key]
        return (x / scale + centre).astype(np.float32)

    def to_dict(self) -> dict[str, Any]:
        out = {
            "modes": dict(self.modes),
            "stats": {k: {n: v.tolist() for n, v in s.items()} for k, s in self.stats.items()},
        }
        if self.min_spread:
            out["min_spread"] = dict(self.min_spread)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Normalizer:
        stats = {k: {n: np.asarray(v, np.float32) for n, v in s.items()}
                 for k, s in d["stats"].items()}
        return cls(stats=stats, modes=dict(d["modes"]), min_spread=dict(d.get("min_spread", {})))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)
