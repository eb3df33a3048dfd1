r"""Run a frozen vision encoder once over episode stores and cache its tokens per step.

Writes ``feature_<camera>`` (tokens, dim) next to every ``image_<camera>`` key; train with
``--model-cfg.vision-encoder-cfg.use-cached-features`` and the same encoder flags.

    python scripts/cache_features.py --dataset-json data/lift.json \
        --model-cfg.vision-encoder-cfg.vision-encoder vit_base_patch16_224.mae
    python scripts/cache_features.py --store data/lift.zarr --camera-keys image_agentview \
        --model-cfg.vision-encoder-cfg.vision-encoder ckpt/mae.pth \
        --model-cfg.vision-encoder-cfg.vision-arch vit_base_patch16_224 --overwrite

Run with -h for every option.
"""


import dataclasses
import json
import logging
from typing import Literal

import tyro

from icrt.cli import run
from icrt.config import VisionEncoderConfig
from icrt.errors import UserError


@dataclasses.dataclass(frozen=True)
class FeatureModelConfig:
    # Camera encoder whose features are cached (same flags as training).
    vision_encoder_cfg: VisionEncoderConfig = VisionEncoderConfig()


@dataclasses.dataclass(frozen=True)
class CacheFeaturesConfig:
    """Cache frozen vision-encoder features in episode stores."""

    # Dataset JSON: every listed store gets features for its image_keys.
    dataset_json: str | None = None
    # Episode stores to process (instead of, or in addition to, the dataset JSON's).
    store: tuple[str, ...] = ()
    # Camera keys to encode (default: the dataset JSON's image_keys, else every image_ key).
    camera_keys: tuple[str, ...] = ()
    # Encoder configuration (--model-cfg.vision-encoder-cfg.*, as in training).
    model_cfg: FeatureModelConfig = FeatureModelConfig()
    # Frames per encoder call.
    batch_size: int = 64
    # Storage precision of the features.
    dtype: Literal["float16", "float32"] = "float16"
    # Device that runs the encoder (default: cuda when available).
    device: str | None = None
    # Recompute features that already exist.
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.dataset_json is None and not self.store:
            raise ValueError("Give --dataset-json or --store.")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1 (got {self.batch_size}).")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = tyro.cli(CacheFeaturesConfig, description=__doc__)
    from icrt.data.spec import DatasetSpec, select_sensors
    from icrt.data.store import EpisodeStore
    from icrt.models.encoders.features import precompute_features, require_frozen_config
    from icrt.models.encoders.vision import VisionEncoder

    jobs: list[tuple[str, tuple[str, ...]]] = []
    if cfg.dataset_json is not None:
        spec = DatasetSpec.load(cfg.dataset_json)
        cams = cfg.camera_keys or (spec.image_keys if spec.image_keys_listed  # else detected
                                   else select_sensors(spec).image_keys)
        if not cams:
            raise UserError(f"Dataset JSON '{cfg.dataset_json}' lists no image_keys to encode.")
        jobs += [(str(s), cams) for s in spec.stores]
    for path in cfg.store:
        cams = cfg.camera_keys or tuple(
            k for k in EpisodeStore.open(path).keys if k.startswith("image_")
        )
        if not cams:
            raise UserError(f"Episode store '{path}' has no image_ keys to encode.")
        jobs.append((path, cams))
    require_frozen_config(cfg.model_cfg.vision_encoder_cfg)
    encoder = VisionEncoder(cfg.model_cfg.vision_encoder_cfg)  # built once for every store
    summary = {}
    for path, cams in jobs:
        summary[path] = precompute_features(
            path, cfg.model_cfg.vision_encoder_cfg, cams, batch_size=cfg.batch_size,
            dtype=cfg.dtype, overwrite=cfg.overwrite, device=cfg.device, encoder=encoder,
        )
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    run(main)
