"""One observation/action codec for training and serving.

What turns stored or live arrays into the numbers the policy sees, and its predictions back into
actions, lives here once: rotation keys to 6D, the concatenation of proprio and action keys,
delta actions relative to the current pose, normalisation, and which store key feeds a camera.
``data/sequence.py`` builds training windows with it; ``eval/inference.py`` serves with it; a
test checks that both give the same tokens for the same episode.

    codec = Codec.from_spec(policy_spec, normalizer)
    proprio = codec.encode_proprio(codec.proprio(obs, T))      # (T, P') normalised
    tokens_in = codec.encode_actions(codec.actions(demo, T))    # (T, A') normalised
    actions = codec.decode_chunk(prediction, current_proprio)   # (K, A') absolute, 6D layout
    env_action = codec.native_action(actions[0])                # rotations in the store format
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from icrt.data.transforms import (
    Normalizer,
    from_delta_action,
    rotated_dim,
    rotation_from_6d,
    rotation_to_6d,
    to_delta_action,
)
from icrt.errors import UserError


def delta_from_data(proprio_keys: Sequence[str], action_keys: Sequence[str],
                    key_meta: Mapping[str, Mapping[str, Any]]) -> tuple[bool, str]:
    """Whether actions should be trained as deltas when no flag says so, and why: yes when the
    (first) action key declares the observed pose its absolute targets refer to."""
    if not action_keys:
        return False, "no action key"
    akey = action_keys[0]
    ref = key_meta.get(akey, {}).get("delta_reference")
    if ref is None:
        return False, f"action key '{akey}' declares no pose reference, so its actions are " \
                      f"taken as they are"
    if ref.get("key") not in proprio_keys:
        return False, f"action key '{akey}' refers to '{ref.get('key')}', which is not a " \
                      f"proprio key"
    return True, f"action key '{akey}' holds absolute pose targets of '{ref['key']}'"


@dataclass
class Codec:
    proprio_keys: tuple[str, ...]
    action_keys: tuple[str, ...]
    key_meta: dict[str, dict[str, Any]]  # per key: shape, rotation, delta_reference, ...
    rot_6d: bool = True
    use_delta_action: bool = False
    normalizer: Normalizer | None = None  # set once statistics are known (training computes them)
    camera_keys: tuple[str, ...] = ()
    use_cached_features: bool = False

    @classmethod
    def from_spec(cls, spec: Any, normalizer: Normalizer | None = None,
                  use_cached_features: bool = False) -> Codec:
        """The codec of a :class:`~icrt.models.policy.PolicySpec` (a checkpoint's)."""
        return cls(tuple(spec.proprio_keys), tuple(spec.action_keys), dict(spec.key_meta),
                   spec.rot_6d, spec.use_delta_action, normalizer, tuple(spec.camera_keys),
                   use_cached_features)

    # ------------------------------------------------------------------ featurisation

    def _rotation(self, key: str) -> dict[str, Any] | None:
        return self.key_meta.get(key, {}).get("rotation") if self.rot_6d else None

    def vector(self, key: str, x: np.ndarray) -> np.ndarray:
        """(T, ...) values of one key -> (T, D') float32, rotations as 6D."""
        x = np.asarray(x, np.float32).reshape(len(x), -1)
        rot = self._rotation(key)
        return rotation_to_6d(x, rot) if rot is not None else x

    def _concat(self, keys: tuple[str, ...], data: Mapping[str, np.ndarray], T: int) -> np.ndarray:
        if not keys:
            return np.zeros((T, 0), np.float32)
        return np.concatenate([self.vector(k, np.asarray(data[k]).reshape(T, -1))
                               for k in keys], axis=-1)

    def proprio(self, data: Mapping[str, np.ndarray], T: int) -> np.ndarray:
        """Low-dim observation keys of ``T`` steps -> (T, P') raw proprio vector."""
        return self._concat(self.proprio_keys, data, T)

    def actions(self, data: Mapping[str, np.ndarray], T: int) -> np.ndarray:
        """Action keys of ``T`` steps (native rotation formats) -> (T, A') raw action vector."""
        return self._concat(self.action_keys, data, T)

    def frame_key(self, camera: str) -> str:
        """The store key read for a camera: its cached encoder features, or its frames."""
        return "feature_" + camera.removeprefix("image_") if self.use_cached_features else camera

    def native_action(self, action: np.ndarray) -> np.ndarray:
        """One (A',) action in the 6D layout -> the environment's (rotations as stored)."""
        rot = self._rotation(self.action_keys[0]) if self.action_keys else None
        if rot is not None:
            action = rotation_from_6d(action[None], rot)[0]
        return np.asarray(action, np.float32)

    # ------------------------------------------------------------------ delta actions

    @cached_property
    def delta(self) -> dict[str, Any] | None:
        """Where the pose sits in the action and proprio vectors (None without delta actions)."""
        if not self.use_delta_action:
            return None
        akey = self.action_keys[0]
        ref = self.key_meta.get(akey, {}).get("delta_reference")
        if ref is None:
            raise UserError(
                f"--shared-cfg.use-delta-action needs action key '{akey}' to declare "
                f"delta_reference (its pose's observation key; see docs/data.md)."
            )
        if ref["key"] not in self.proprio_keys:
            raise UserError(f"Action key '{akey}' is relative to '{ref['key']}', which is not "
                            f"among the proprio keys {list(self.proprio_keys)}.")
        offset = 0
        for k in self.proprio_keys:
            if k == ref["key"]:
                break
            offset += rotated_dim(int(np.prod(self.key_meta[k]["shape"])), self._rotation(k))
        arot, prot = self._rotation(akey), self._rotation(ref["key"])
        if (arot is None) != (prot is None):
            raise UserError(
                f"Delta actions need both '{akey}' and '{ref['key']}' to declare a rotation, or "
                f"neither (with --shared-cfg.rot-6d)."
            )
        return {
            "offset": offset,
            "pos_dims": int(ref.get("pos_dims", 3)),
            "action_rot": None if arot is None else int(arot["start"]),
            "proprio_rot": None if prot is None else int(prot["start"]),
        }

    def _reference(self, proprio: np.ndarray, action_dim: int) -> np.ndarray:
        """(N, P') raw proprio -> (N, A') current pose laid out like an action."""
        d = self.delta
        cur = proprio[:, d["offset"]:]
        ref = np.zeros((len(proprio), action_dim), np.float32)
        ref[:, : d["pos_dims"]] = cur[:, : d["pos_dims"]]
        if d["proprio_rot"] is not None:
            ref[:, d["action_rot"] : d["action_rot"] + 6] = \
                cur[:, d["proprio_rot"] : d["proprio_rot"] + 6]
        return ref

    def to_delta(self, chunk: np.ndarray, proprio: np.ndarray) -> np.ndarray:
        """(N, K, A') absolute chunks, (N, P') raw proprio -> chunks relative to that pose."""
        d = self.delta
        n, k, a = chunk.shape
        ref = np.repeat(self._reference(proprio, a), k, axis=0)
        flat = to_delta_action(chunk.reshape(n * k, a), ref, d["pos_dims"], d["action_rot"])
        return flat.reshape(n, k, a).astype(np.float32)

    # ------------------------------------------------------------------ normalisation

    def _norm(self) -> Normalizer:
        if self.normalizer is None:
            raise RuntimeError("the codec has no normaliser yet")
        return self.normalizer

    def encode_proprio(self, raw: np.ndarray) -> np.ndarray:
        return self._norm().normalize("proprio", raw)

    def encode_actions(self, raw: np.ndarray) -> np.ndarray:
        """Absolute (T, A') actions -> normalised action-token inputs."""
        return self._norm().normalize("action", raw)

    def encode_chunk(self, chunk: np.ndarray, proprio: np.ndarray | None = None) -> np.ndarray:
        """(N, K, A') absolute chunks -> normalised targets (relative to ``proprio`` (N, P')
        with delta actions)."""
        if self.delta is not None:
            chunk = self.to_delta(chunk, proprio)
        return self._norm().normalize(self._norm().target_key, chunk)

    def decode_chunk(self, chunk: np.ndarray, proprio: np.ndarray) -> np.ndarray:
        """A normalised (K, A') prediction and the current (P',) raw proprio -> absolute
        actions in the 6D-rotation layout."""
        x = self._norm().unnormalize(self._norm().target_key, chunk)
        if self.delta is not None:
            d = self.delta
            ref = self._reference(np.asarray(proprio, np.float32)[None], x.shape[-1])
            x = from_delta_action(x, np.repeat(ref, len(x), axis=0), d["pos_dims"],
                                  d["action_rot"])
        return np.asarray(x, np.float32)
