"""Precomputed camera features: run a frozen encoder once, train from the cached tokens.

A frozen ViT dominates the cost of a training step (it sees every camera frame of every
sequence, every epoch). :func:`precompute_features` runs it once over a store and writes
``feature_<camera>`` (P, C) per step next to ``image_<camera>``, with metadata naming the
encoder (timm name or checkpoint file, architecture, pretrained or not, input size, token
shape and a hash of the weights). :func:`check_cached_features` compares that metadata with
the configured encoder so a run never trains on features of a different encoder.

    precompute_features("data/lift.zarr", vision_cfg, ["image_agentview"])
    check_cached_features(store, vision_cfg, ["image_agentview"], encoder=obs_enc.vision)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from icrt.config import PolicyConfig, VisionEncoderConfig
from icrt.data.store import EpisodeStore
from icrt.errors import UserError
from icrt.fsutil import remove_leftovers
from icrt.models.encoders.vision import (
    ObservationEncoder,
    VisionEncoder,
    encoder_id,
    feature_key,
    is_checkpoint_path,
)

log = logging.getLogger(__name__)

_FLAG = "--model-cfg.vision-encoder-cfg."
FEATURE_DTYPES = ("float16", "float32")


def require_frozen_config(cfg: VisionEncoderConfig) -> None:
    """Cached features are only valid for an encoder that never changes during training."""
    if cfg.vision_lora or cfg.vision_unfreeze_all or cfg.vision_unfreeze_last_n:
        raise UserError(
            f"Cached features need a frozen encoder, but the config trains it ({_FLAG}"
            f"vision-lora / vision-unfreeze-all / vision-unfreeze-last-n)."
        )


def feature_metadata(encoder: VisionEncoder, source_key: str, dtype: str) -> dict[str, Any]:
    """What a cached feature key records about the encoder that produced it."""
    import timm

    cfg = encoder.cfg
    return {
        "encoder": encoder_id(cfg),
        "encoder_arch": encoder.arch,
        "pretrained": encoder.pretrained,
        "image_size": encoder.image_size,
        "image_size_cfg": cfg.vision_image_size,
        "num_tokens": encoder.num_tokens,
        "dim": encoder.out_dim,
        "weights_sha1": encoder.weights_fingerprint(),
        "source_key": source_key,
        "feature_dtype": dtype,
        "timm_version": timm.__version__,
    }


def _describe(encoder: str, arch: str, pretrained: bool, size: Any) -> str:
    weights = "pretrained" if pretrained else "random"
    size_txt = "native size" if size is None else f"{size} px"
    return f"'{encoder}' ({arch}, {weights} weights, {size_txt})"


def check_cached_features(
    store: EpisodeStore | str | Path,
    vision_cfg: VisionEncoderConfig,
    camera_keys: Sequence[str],
    encoder: VisionEncoder | None = None,
) -> None:
    """Raise :class:`UserError` unless every camera has cached features of the configured
    encoder. With ``encoder`` given, also the token shape and the exact weights must match
    (this is what catches two different random inits, or a changed checkpoint file)."""
    if not isinstance(store, EpisodeStore):
        store = EpisodeStore.open(store)
    path_cfg = is_checkpoint_path(vision_cfg.vision_encoder)
    want_arch = vision_cfg.vision_arch if path_cfg else vision_cfg.vision_encoder
    want = {
        "encoder": encoder_id(vision_cfg),
        "encoder_arch": want_arch,
        "pretrained": not vision_cfg.vision_nonpretrained,
    }
    for cam in camera_keys:
        fkey = feature_key(cam)
        if fkey not in store.keys:
            raise UserError(
                f"Episode store '{store.path}' has no cached features '{fkey}' for camera "
                f"'{cam}'; run scripts/cache_features.py or drop {_FLAG}use-cached-features."
            )
        meta = store.key_info(fkey)
        have_size = meta.get("image_size_cfg")
        size_ok = (
            have_size is None and vision_cfg.vision_image_size is None
        ) or vision_cfg.vision_image_size == meta.get("image_size")
        if encoder is not None:
            size_ok = encoder.image_size == meta.get("image_size")
        if any(meta.get(k) != v for k, v in want.items()) or not size_ok:
            have = _describe(meta.get("encoder", "?"), meta.get("encoder_arch", "?"),
                             bool(meta.get("pretrained")), meta.get("image_size"))
            cfg_size = encoder.image_size if encoder is not None else vision_cfg.vision_image_size
            wanted = _describe(want["encoder"], want_arch, want["pretrained"], cfg_size)
            raise UserError(
                f"Cached features '{fkey}' of store '{store.path}' come from encoder {have}, "
                f"but the config uses {wanted}; rerun scripts/cache_features.py --overwrite."
            )
        if encoder is not None:
            shape = [encoder.num_tokens, encoder.out_dim]
            if list(meta.get("shape", [])) != shape:
                raise UserError(
                    f"Cached features '{fkey}' of store '{store.path}' have shape "
                    f"{tuple(meta.get('shape', []))}, but the encoder makes {tuple(shape)}; "
                    f"rerun scripts/cache_features.py --overwrite."
                )
            if meta.get("weights_sha1") != encoder.weights_fingerprint():
                raise UserError(
                    f"Cached features '{fkey}' of store '{store.path}' were computed with "
                    f"different weights of encoder '{want['encoder']}'; rerun "
                    f"scripts/cache_features.py --overwrite."
                )


def precompute_features(
    store_path: str | Path,
    vision_cfg: VisionEncoderConfig,
    camera_keys: Sequence[str],
    batch_size: int = 64,
    dtype: str = "float16",
    progress: bool = True,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    encoder: VisionEncoder | None = None,
) -> list[str]:
    """Encode every step's frame of each camera and store it as ``feature_<cam>`` (P, C).

    Rows go through a memory-mapped temporary file next to the store, so stores whose
    features exceed RAM still work. ``encoder`` reuses an existing (frozen) encoder, e.g. the
    one inside a policy; otherwise one is built from ``vision_cfg``. Returns the written keys.
    """
    require_frozen_config(vision_cfg)
    if dtype not in FEATURE_DTYPES:
        raise UserError(f"Feature dtype must be one of {', '.join(FEATURE_DTYPES)}, not {dtype}.")
    if batch_size < 1:
        raise UserError(f"Feature batch size must be >= 1 (got {batch_size}).")
    store = EpisodeStore.open(store_path, mode="a")
    if store.num_steps == 0:
        raise UserError(f"Episode store '{store.path}' is empty; there is nothing to encode.")
    for cam in camera_keys:
        if store.key_info(cam)["kind"] != "image":  # key_info raises for a missing key
            raise UserError(f"Key '{cam}' of store '{store.path}' is not a camera image key.")
        if feature_key(cam) in store.keys and not overwrite:
            raise UserError(
                f"Episode store '{store.path}' already has '{feature_key(cam)}'; pass "
                f"--overwrite to recompute it."
            )
    encoder_given = encoder is not None
    if encoder is None:
        encoder = VisionEncoder(vision_cfg)
    elif not encoder.frozen:
        raise UserError("Cached features need a frozen encoder, but the given one trains.")
    if not encoder.pretrained:
        log.warning("caching features of a randomly initialised encoder: only an encoder with "
                    "these exact weights will accept them")
    if device is None:  # a given encoder stays where it is; a new one goes to the GPU if any
        device = next(encoder.parameters()).device if encoder_given else (
            "cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device, str):
        from icrt.train.dist import resolve_device

        device = resolve_device(device)
    encoder = encoder.to(device)  # frozen: always in eval mode (VisionEncoder.train)
    written = []
    for cam in camera_keys:
        fkey = feature_key(cam)
        meta = feature_metadata(encoder, cam, dtype)
        n = store.num_steps
        chunk = int(store.array(cam).chunks[0])
        block = chunk * max(1, -(-batch_size // chunk))  # whole chunks per read
        shape = (n, encoder.num_tokens, encoder.out_dim)
        t0 = time.perf_counter()
        # rows go through a memory map beside the store; a killed run's map is removed below
        remove_leftovers(store.path.parent, rf"^\.features-{re.escape(store.path.name)}-"
                         r"(?P<pid>\d+)-", "feature caching")
        with tempfile.TemporaryDirectory(
            dir=store.path.parent, prefix=f".features-{store.path.name}-{os.getpid()}-"
        ) as tmp:
            rows = np.lib.format.open_memmap(Path(tmp) / "rows.npy", mode="w+",
                                             dtype=np.dtype(dtype), shape=shape)
            bar = _progress(n, f"{store.path.name}:{fkey}", progress)
            for start in range(0, n, block):
                images = store.read(cam, start, start + block)  # (b, H, W, 3) uint8
                for s in range(0, len(images), batch_size):
                    x = torch.from_numpy(images[s : s + batch_size]).to(device)
                    with torch.inference_mode():
                        tokens = encoder(x)  # (b, P, C)
                    lo = start + s
                    rows[lo : lo + len(x)] = tokens.float().cpu().numpy().astype(dtype)
                    bar.update(len(x))
            bar.close()
            rows.flush()
            store.write_key(fkey, rows, overwrite=overwrite, **meta)
            del rows
        log.info("%s: wrote %s %s in %.1f s", store.path, fkey, shape, time.perf_counter() - t0)
        written.append(fkey)
    store.close()  # releases the writer lock
    return written


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="frame", disable=not enabled)


def benchmark_feature_cache(
    vision_cfg: VisionEncoderConfig | None = None,
    batch_size: int = 8,
    seq_length: int = 16,
    num_cameras: int = 2,
    image_size: int = 84,
    proprio_dim: int = 9,
    d_model: int = 256,
    action_dim: int = 7,
    steps: int = 5,
    warmup: int = 2,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> dict[str, float]:
    """Training-style throughput of the state-token builder from pixels vs cached features.

    One step = ObservationEncoder forward (with augmentation on the pixel path) + a tiny MLP
    action head + L1 loss + backward + AdamW step, on (batch_size, seq_length) sequences.
    Returns sequences/s and timesteps/s of both paths and their ratio. The cached features
    are computed once by the same encoder and kept on the device as float16, like a loader
    would deliver them.
    """
    vision_cfg = vision_cfg or VisionEncoderConfig(
        vision_encoder="vit_tiny_patch16_224", vision_nonpretrained=True
    )
    device = torch.device(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    policy_cfg = PolicyConfig()
    cams = tuple(f"image_cam{i}" for i in range(num_cameras))
    results: dict[str, float] = {}
    b, t = batch_size, seq_length
    images = {
        k: torch.randint(0, 256, (b, t, image_size, image_size, 3), dtype=torch.uint8,
                         generator=gen).to(device)
        for k in cams
    }
    proprio = torch.randn(b, t, proprio_dim, generator=gen).to(device)
    target = torch.randn(b, t, action_dim, generator=gen).to(device)
    for mode in ("pixels", "cached"):
        cfg = dataclasses.replace(vision_cfg, use_cached_features=True)
        torch.manual_seed(seed)
        enc = ObservationEncoder(cfg, policy_cfg, cams, proprio_dim, d_model, vision_aug=True)
        enc = enc.to(device).train()
        head = torch.nn.Sequential(torch.nn.Linear(d_model, d_model), torch.nn.GELU(),
                                   torch.nn.Linear(d_model, action_dim)).to(device)
        params = [p for p in [*enc.parameters(), *head.parameters()] if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        obs: dict[str, torch.Tensor] = {"proprio": proprio}
        if mode == "pixels":
            obs.update(images)
        else:
            with torch.inference_mode():
                for k, v in images.items():
                    feats = enc.vision(v.reshape(-1, *v.shape[-3:]))  # (B*T, P, C)
                    obs[feature_key(k)] = feats.view(b, t, *feats.shape[1:]).half().clone()
        for i in range(warmup + steps):
            if i == warmup:
                _sync(device)
                t0 = time.perf_counter()
            loss = (head(enc(obs, train_aug=True)) - target).abs().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        _sync(device)
        dt = (time.perf_counter() - t0) / steps
        results[f"{mode}_seq_per_s"] = b / dt
        results[f"{mode}_steps_per_s"] = b * t / dt
        results[f"{mode}_s_per_iter"] = dt
    results["speedup"] = results["cached_seq_per_s"] / results["pixels_seq_per_s"]
    return results


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


__all__ = [
    "benchmark_feature_cache",
    "check_cached_features",
    "feature_metadata",
    "precompute_features",
    "require_frozen_config",
]
