"""Perturbations of the observations a policy sees at evaluation time (``--test-augmentation``).

    aug = TestAugmentation(obs_noise_std=0.01, brightness=0.1, contrast=0.1, shift=4,
                           low_dim_keys=("state",), camera_keys=("image_corner",))
    perturb = ObservationPerturber(aug, seed=episode_seed)
    policy.act(perturb(obs))       # the simulator's own observation and state are untouched

* low-dimensional keys: Gaussian noise of standard deviation ``obs_noise_std`` in the key's
  raw units, drawn afresh every step;
* camera keys (uint8 (H, W, 3) frames): per episode and camera, a brightness offset drawn
  uniformly from [-brightness, brightness] (as a fraction of 255) and a contrast factor from
  [1 - contrast, 1 + contrast] (about the frame's mean intensity), like a change of lighting;
  every step, a shift by up to ``shift`` pixels in each direction (edges replicated), like a
  shaking camera.

Everything is drawn from a generator seeded by the episode seed alone, so an episode sees the
same perturbations on every run, with any number of workers or batched simulators.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

_STREAM = 0x617567  # separates the perturbation generator from others seeded by the episode


@dataclass(frozen=True)
class TestAugmentation:
    __test__ = False  # not a pytest class

    obs_noise_std: float
    brightness: float
    contrast: float
    shift: int
    low_dim_keys: tuple[str, ...]
    camera_keys: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["low_dim_keys"], out["camera_keys"] = list(self.low_dim_keys), list(self.camera_keys)
        return out


def shift_frame(frame: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """``frame`` (H, W, C) moved by (dy, dx) pixels, the uncovered border edge-replicated."""
    pad = max(abs(dy), abs(dx))
    if pad == 0:
        return frame
    h, w = frame.shape[:2]
    padded = np.pad(frame, ((pad, pad), (pad, pad), (0, 0)), mode="edge")
    return padded[pad - dy:pad - dy + h, pad - dx:pad - dx + w]


def jitter_frame(frame: np.ndarray, brightness: float, contrast: float) -> np.ndarray:
    """uint8 ``frame`` with contrast scaled by ``contrast`` about its mean intensity and
    ``brightness`` x 255 added, rounded and clipped to uint8."""
    x = frame.astype(np.float32)
    mean = float(x.mean())
    x = (x - mean) * contrast + mean + 255.0 * brightness
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


class ObservationPerturber:
    """The perturbations of one episode; call it on each observation, in order."""

    def __init__(self, aug: TestAugmentation, seed: int) -> None:
        self.aug = aug
        self.rng = np.random.default_rng([int(seed), _STREAM])
        # lighting of each camera, fixed for the episode
        self.lighting = {
            k: (float(self.rng.uniform(-aug.brightness, aug.brightness)),
                float(self.rng.uniform(1.0 - aug.contrast, 1.0 + aug.contrast)))
            for k in aug.camera_keys
        }

    def describe(self) -> dict[str, Any]:
        """The episode's lighting per camera (for the results JSON)."""
        return {k: {"brightness": b, "contrast": c} for k, (b, c) in self.lighting.items()}

    def __call__(self, obs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        aug, out = self.aug, dict(obs)
        for k in aug.low_dim_keys:
            if aug.obs_noise_std > 0 and k in obs:
                v = np.asarray(obs[k])
                if np.issubdtype(v.dtype, np.floating):
                    out[k] = (v + self.rng.normal(0.0, aug.obs_noise_std, v.shape)).astype(
                        v.dtype)
        for k in aug.camera_keys:
            if k not in obs:
                continue
            frame = np.asarray(obs[k])
            if frame.ndim != 3 or frame.dtype != np.uint8:
                raise ValueError(f"Camera '{k}' gives {frame.dtype} frames of shape "
                                 f"{frame.shape}; test augmentation takes uint8 (H, W, C).")
            b, c = self.lighting[k]
            if b != 0.0 or c != 1.0:
                frame = jitter_frame(frame, b, c)
            if aug.shift > 0:
                dy, dx = (int(d) for d in self.rng.integers(-aug.shift, aug.shift + 1, 2))
                frame = shift_frame(frame, dy, dx)
            out[k] = np.ascontiguousarray(frame)
        return out
