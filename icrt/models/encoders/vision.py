"""Camera encoders and the state-token builder: pixels (or cached features) + proprio -> tokens.

Three layers, each usable on its own:

* :class:`VisionEncoder` wraps a timm backbone (a name such as ``vit_base_patch16_224.mae``,
  or a local checkpoint file of ``--vision-arch``) and turns uint8 camera images (N, H, W, 3)
  into a token set (N, P, C): every ViT token including the class token, or a CNN's flattened
  spatial map. It owns resizing and the model's mean/std normalisation, and decides which of
  its weights train (frozen, last N blocks, LoRA or all).
* :class:`AttentionPool` condenses a token set (plus optional extra tokens such as the proprio
  feature) into one vector with a learned query, as ICRT's attention-pooling adapter does.
* :class:`ObservationEncoder` is what the policy calls: per timestep it encodes every camera
  (one encoder call per camera over the flattened B*T batch, or precomputed ``feature_<cam>``
  arrays), adds the proprio token and pools everything into one state token of ``d_model``.

timm and peft are imported here only, so ``import icrt`` stays light.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icrt.config import PolicyConfig, VisionEncoderConfig
from icrt.errors import UserError

log = logging.getLogger(__name__)

_FLAG = "--model-cfg.vision-encoder-cfg."
# File suffixes that mark --vision-encoder as a local checkpoint rather than a timm name.
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors", ".ckpt")
# peft target (full match on module names): the attention projections of timm transformers.
LORA_TARGET_PATTERN = r".*\.attn\.(qkv|proj|q_proj|k_proj|v_proj)"
# Dict keys that wrap a state dict inside a training checkpoint, tried in this order.
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module", "model_ema",
                 "state_dict_ema", "teacher", "student")
# Checkpoint entries that the features-only encoder never uses (MAE decoder, classifier).
_IGNORED_PREFIXES = ("decoder_", "head.", "fc.", "classifier.")


def is_checkpoint_path(name: str) -> bool:
    """Whether ``--vision-encoder`` names a local file rather than a timm model.

    timm names never end in a checkpoint suffix and contain no path separator (``hf-hub:``
    names are the exception and stay names); an existing file is always a path.
    """
    if name.startswith(("hf-hub:", "hf_hub:")):
        return False
    return (
        Path(name).suffix.lower() in CHECKPOINT_SUFFIXES
        or "/" in name
        or os.sep in name
        or Path(name).is_file()
    )


def encoder_id(cfg: VisionEncoderConfig) -> str:
    """A short, machine-independent name of the configured encoder weights.

    Used in cached-feature metadata: a timm name as given, or ``file:<basename>`` for a local
    checkpoint (the directory differs between machines; the weight hash catches real changes).
    """
    if is_checkpoint_path(cfg.vision_encoder):
        return f"file:{Path(cfg.vision_encoder).name}"
    return cfg.vision_encoder


# --------------------------------------------------------------------------- checkpoint loading


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint file without executing pickled code (argparse.Namespace allowed, as
    MAE and many training scripts store their arguments next to the weights)."""
    try:
        if path.suffix.lower() == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, foreign pickle, truncated download, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"Could not read vision checkpoint '{path}': {msg}") from None
    if not isinstance(obj, Mapping):
        raise UserError(f"Vision checkpoint '{path}' does not hold a state dict.")
    return dict(obj)


def _unwrap_state_dict(obj: Mapping[str, Any]) -> dict[str, Tensor]:
    """Descend through training-checkpoint wrappers ({"model": ...}, {"state_dict": ...})."""
    for _ in range(4):
        if any(isinstance(v, Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def _strip_best_prefix(sd: dict[str, Tensor], model_keys: set[str]) -> dict[str, Tensor]:
    """Remove the key prefix (``module.``, ``encoder.``, ``vision.model.``, ...) under which the
    most checkpoint entries match the model, if that beats using the keys as they are."""
    counts: dict[str, int] = {"": sum(k in model_keys for k in sd)}
    for k in sd:
        for i, ch in enumerate(k):
            if ch == "." and k[i + 1 :] in model_keys:
                counts[k[: i + 1]] = counts.get(k[: i + 1], 0) + 1
    best = max(counts, key=lambda p: (counts[p], -len(p)))
    if not best or counts[best] <= counts[""]:
        return sd
    log.info("vision checkpoint: stripping key prefix '%s'", best)
    return {k[len(best) :]: v for k, v in sd.items() if k.startswith(best)}


def load_checkpoint_into(model: nn.Module, path: Path) -> None:
    """Load a local checkpoint into a timm model, tolerating wrappers, prefixes, MAE decoder
    weights and a different ViT resolution; refuses only when *nothing* fits."""
    sd = _unwrap_state_dict(_read_checkpoint(path))
    model_sd = model.state_dict()
    sd = _strip_best_prefix(sd, set(model_sd))
    if any(k.startswith("decoder_") for k in sd):  # MAE pre-training checkpoint
        sd = {k: v for k, v in sd.items() if not k.startswith("decoder_") and k != "mask_token"}
    from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

    if isinstance(model, VisionTransformer):  # resample pos_embed / patch_embed, convert formats
        sd = checkpoint_filter_fn(sd, model)
    matched = {k: v for k, v in sd.items() if k in model_sd and v.shape == model_sd[k].shape}
    if not matched:
        raise UserError(
            f"Vision checkpoint '{path}' has no weights that fit the timm architecture "
            f"'{type(model).__name__}' (set {_FLAG}vision-arch to the checkpoint's architecture)."
        )
    wrong_shape = sorted(k for k in sd if k in model_sd and k not in matched)
    unexpected = sorted(
        k for k in sd if k not in model_sd and not k.startswith(_IGNORED_PREFIXES)
    )
    missing = sorted(k for k in model_sd if k not in matched)
    model.load_state_dict(matched, strict=False)
    log.info("vision checkpoint '%s': loaded %d of %d tensors", path, len(matched), len(model_sd))
    if missing:
        log.warning("vision checkpoint '%s': %d model tensors not in the file (random init): %s",
                    path, len(missing), ", ".join(missing[:10]))
    if unexpected:
        log.warning("vision checkpoint '%s': %d unused tensors: %s", path, len(unexpected),
                    ", ".join(unexpected[:10]))
    if wrong_shape:
        log.warning("vision checkpoint '%s': %d tensors with the wrong shape skipped: %s",
                    path, len(wrong_shape), ", ".join(wrong_shape[:10]))


def _create_timm(arch: str, pretrained: bool, image_size: int | None) -> nn.Module:
    """``timm.create_model`` features-only, with ``img_size`` for models that take one (ViTs
    resize their position embeddings); turns missing weights into one-sentence errors."""
    import timm

    if not arch.startswith(("hf-hub:", "hf_hub:")) and not timm.is_model(arch):
        raise UserError(
            f"Unknown timm model '{arch}' for {_FLAG}vision-encoder (see timm.list_models(), "
            f"or give a local checkpoint file ending in {', '.join(CHECKPOINT_SUFFIXES)})."
        )
    kwargs: dict[str, Any] = {"num_classes": 0}
    if image_size is not None:
        kwargs["img_size"] = image_size
    try:
        try:
            return timm.create_model(arch, pretrained=pretrained, **kwargs)
        except TypeError as e:  # CNNs take any size and have no img_size argument
            if "img_size" not in str(e):
                raise
            kwargs.pop("img_size")
            return timm.create_model(arch, pretrained=pretrained, **kwargs)
    except (TypeError, UserError):
        raise
    except Exception as e:  # offline hub, missing cache, HTTP error, no weights published
        if not pretrained:
            raise
        raise UserError(
            f"Could not load pretrained weights for timm model '{arch}' ({type(e).__name__}); "
            f"pass a local checkpoint file as {_FLAG}vision-encoder or use "
            f"{_FLAG}vision-nonpretrained."
        ) from None


def _block_list(model: nn.Module) -> list[nn.Module]:
    """The model's sequential blocks, for --vision-unfreeze-last-n: transformer blocks, or
    the stages of a CNN (ResNet layer1..layer4, ConvNeXt/EfficientNet-style stages)."""
    for name in ("blocks", "stages"):
        seq = getattr(model, name, None)
        if isinstance(seq, (nn.Sequential, nn.ModuleList)) and len(seq):
            return list(seq)
    layers = [getattr(model, f"layer{i}", None) for i in range(1, 5)]
    if all(isinstance(m, nn.Module) for m in layers):
        return layers  # type: ignore[return-value]
    raise UserError(
        f"{_FLAG}vision-unfreeze-last-n does not know the blocks of '{type(model).__name__}'; "
        f"use {_FLAG}vision-unfreeze-all or {_FLAG}vision-lora instead."
    )


def batchnorm_to_groupnorm(model: nn.Module, channels_per_group: int = 16) -> int:
    """Replace every ``nn.BatchNorm2d`` of ``model`` by a GroupNorm with the same affine
    weights (diffusion_policy's ``replace_bn_with_gn``); returns how many were replaced.

    BatchNorm statistics of a batch of sequences are dominated by a few episodes and differ
    between training and acting; GroupNorm has no running statistics. BatchNorm variants that
    fuse an activation (timm's ``BatchNormAct2d``) are refused rather than silently dropped.
    """
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.BatchNorm2d:
                c = child.num_features
                gn = nn.GroupNorm(max(1, c // channels_per_group), c, eps=child.eps,
                                  affine=child.affine)
                if child.affine:
                    with torch.no_grad():
                        gn.weight.copy_(child.weight)
                        gn.bias.copy_(child.bias)
                setattr(module, child_name, gn)
                replaced += 1
            elif isinstance(child, nn.modules.batchnorm._BatchNorm):
                where = f"{name}.{child_name}" if name else child_name
                raise UserError(
                    f"{_FLAG}vision-group-norm cannot replace '{where}' "
                    f"({type(child).__name__}); use a model with plain BatchNorm2d layers "
                    f"such as resnet18."
                )
    return replaced


# --------------------------------------------------------------------------- vision encoder


class VisionEncoder(nn.Module):
    """A timm backbone as a camera tokeniser: uint8 (N, H, W, 3) -> tokens (N, P, C).

    The model's own preprocessing (input size, mean/std) is part of the module so callers pass
    raw camera frames. Which weights train follows the config; a fully frozen encoder always
    runs in eval mode under ``no_grad`` (no activations kept, BatchNorm statistics fixed).
    """

    def __init__(self, cfg: VisionEncoderConfig) -> None:
        super().__init__()
        from timm.data import resolve_data_config

        self.cfg = cfg
        self.name = cfg.vision_encoder
        path = is_checkpoint_path(cfg.vision_encoder)
        self.arch = cfg.vision_arch if path else cfg.vision_encoder
        self.pretrained = not cfg.vision_nonpretrained
        if cfg.vision_unfreeze_all and (cfg.vision_lora or cfg.vision_unfreeze_last_n):
            raise UserError(
                f"{_FLAG}vision-unfreeze-all already trains every encoder weight; drop "
                f"{_FLAG}vision-lora / {_FLAG}vision-unfreeze-last-n."
            )
        if path and self.pretrained:
            file = Path(cfg.vision_encoder).expanduser()
            if not file.is_file():
                raise UserError(
                    f"Vision checkpoint '{file}' ({_FLAG}vision-encoder) does not exist."
                )
            self.model = _create_timm(self.arch, False, cfg.vision_image_size)
            self._group_norm(cfg)  # before loading, so a GroupNorm checkpoint loads fully
            load_checkpoint_into(self.model, file)
        else:
            if path:
                log.warning("%svision-nonpretrained: ignoring checkpoint '%s', random weights",
                            _FLAG, cfg.vision_encoder)
            # random weights are a fixed function of the config (seed 0, global RNG untouched),
            # so features cached by another process match the training run's encoder
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.model = _create_timm(self.arch, self.pretrained, cfg.vision_image_size)
            self._group_norm(cfg)

        data_cfg = resolve_data_config({}, model=self.model)
        native = int(data_cfg["input_size"][-1])
        self.image_size = int(cfg.vision_image_size or native)
        mean = torch.tensor(data_cfg["mean"], dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(data_cfg["std"], dtype=torch.float32).view(1, 3, 1, 1)
        # Derived from the architecture, not learned: kept out of the state dict.
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

        self._trainable_units = self._setup_trainable(cfg)
        self.model.eval()
        with torch.no_grad():
            probe = self._tokens(torch.zeros(1, 3, self.image_size, self.image_size))
        self.num_tokens, self.out_dim = int(probe.shape[1]), int(probe.shape[2])
        self.train()

    def _group_norm(self, cfg: VisionEncoderConfig) -> None:
        if cfg.vision_group_norm and not batchnorm_to_groupnorm(self.model):
            raise UserError(
                f"{_FLAG}vision-group-norm: timm model '{self.arch}' has no BatchNorm layers "
                f"to replace."
            )

    # ----------------------------------------------------------------- trainability

    def _setup_trainable(self, cfg: VisionEncoderConfig) -> list[nn.Module]:
        """Freeze everything, then re-enable what the config trains; returns the modules that
        follow train()/eval() (the rest stays in eval mode)."""
        self.model.requires_grad_(False)
        if cfg.vision_unfreeze_all:
            self.model.requires_grad_(True)
            return [self.model]
        units: list[nn.Module] = []
        if cfg.vision_lora:
            from peft import LoraConfig, inject_adapter_in_model

            lora_cfg = LoraConfig(r=cfg.vision_lora_rank, target_modules=LORA_TARGET_PATTERN)
            try:
                inject_adapter_in_model(lora_cfg, self.model)
            except ValueError:  # peft: no module matched the target pattern
                raise UserError(
                    f"{_FLAG}vision-lora needs attention layers (attn.qkv / attn.proj), which "
                    f"timm model '{self.arch}' does not have; use "
                    f"{_FLAG}vision-unfreeze-last-n instead."
                ) from None
            for n, p in self.model.named_parameters():
                p.requires_grad_("lora_" in n)
        n = cfg.vision_unfreeze_last_n
        if n:
            blocks = _block_list(self.model)
            if n > len(blocks):
                raise UserError(
                    f"{_FLAG}vision-unfreeze-last-n is {n}, but '{self.arch}' has only "
                    f"{len(blocks)} blocks."
                )
            units = blocks[-n:]
            for name in ("norm", "fc_norm"):  # the final norm after the last block
                norm = getattr(self.model, name, None)
                if isinstance(norm, nn.Module) and any(True for _ in norm.parameters()):
                    units.append(norm)
            for unit in units:
                unit.requires_grad_(True)
        return units

    @property
    def frozen(self) -> bool:
        """No encoder weight trains (features could be cached)."""
        return not any(p.requires_grad for p in self.parameters())

    def trainable_parameters(self) -> int:
        """Number of encoder weights the optimiser updates."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def train(self, mode: bool = True) -> VisionEncoder:
        """Frozen parts stay in eval mode (fixed BatchNorm statistics, no dropout)."""
        self.training = mode
        self.model.eval()
        for unit in self._trainable_units:
            unit.train(mode)
        return self

    def weights_fingerprint(self) -> str:
        """SHA-1 of every weight, so cached features can be tied to the exact encoder."""
        h = hashlib.sha1()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()

    # ----------------------------------------------------------------- forward

    @staticmethod
    def to_float(images: Tensor) -> Tensor:
        """uint8 camera frames (N, H, W, 3) -> float (N, 3, H, W) in [0, 1]."""
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"expected uint8 images (N, H, W, 3), got {images.dtype} {tuple(images.shape)}"
            )
        return images.permute(0, 3, 1, 2).float().div_(255.0)

    def normalize(self, x: Tensor) -> Tensor:
        """(N, 3, H, W) in [0, 1] -> resized to image_size and mean/std-normalised."""
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return (x - self.mean) / self.std

    def _tokens(self, x: Tensor) -> Tensor:
        """Normalised pixels (N, 3, S, S) -> tokens (N, P, C), whatever layout timm returns."""
        feats = self.model.forward_features(x)
        if feats.ndim == 3:  # (N, P, C): ViT-style, class/register tokens included
            return feats
        if feats.ndim == 4:
            c = self.model.num_features
            if feats.shape[1] == c:  # (N, C, h, w): CNN feature map
                return feats.flatten(2).transpose(1, 2)
            if feats.shape[-1] == c:  # (N, h, w, C): channels-last models (Swin, ...)
                return feats.flatten(1, 2)
        raise ValueError(f"cannot turn features of shape {tuple(feats.shape)} into tokens")

    def forward_float(self, x: Tensor) -> Tensor:
        """Float images (N, 3, H, W) in [0, 1] (e.g. after augmentation) -> tokens (N, P, C)."""
        x = self.normalize(x.to(self.mean.dtype))
        if self.frozen:
            with torch.no_grad():
                return self._tokens(x)
        return self._tokens(x)

    def forward(self, images: Tensor) -> Tensor:
        """uint8 camera frames (N, H, W, 3) -> tokens (N, P, C)."""
        return self.forward_float(self.to_float(images))

    def extra_repr(self) -> str:
        return (f"encoder={self.name!r}, arch={self.arch!r}, image_size={self.image_size}, "
                f"tokens={self.num_tokens}, dim={self.out_dim}, "
                f"trainable={self.trainable_parameters()}")


# --------------------------------------------------------------------------- augmentation


def augment_images(
    images: Tensor,
    generator: torch.Generator | None = None,
    brightness: float = 0.1,
    contrast: tuple[float, float] = (0.8, 1.2),
    pad: int = 4,
) -> Tensor:
    """ICRT-style photometric jitter plus a DrQ-style random shift, per image.

    images: float (N, 3, H, W) in [0, 1]. Each image gets an additive brightness offset in
    [-brightness, brightness], a contrast factor in ``contrast`` around its grey mean, and
    (``pad`` > 0) is edge-padded by ``pad`` pixels and cropped back at a random offset, which
    makes the policy robust to small camera shifts. All randomness comes from ``generator``
    (drawn on its device), so a seeded generator gives the same result every time.
    """
    n, _, h, w = images.shape
    gen_device = generator.device if generator is not None else images.device

    def uniform(lo: float, hi: float) -> Tensor:
        u = torch.rand(n, generator=generator, device=gen_device)
        return (lo + (hi - lo) * u).to(images.device, images.dtype).view(n, 1, 1, 1)

    b = uniform(-brightness, brightness)
    c = uniform(*contrast)
    grey = (0.299 * images[:, 0] + 0.587 * images[:, 1] + 0.114 * images[:, 2])
    mean = grey.mean(dim=(1, 2)).view(n, 1, 1, 1)  # (N, 1, 1, 1)
    out = ((images - mean) * c + mean + b).clamp_(0.0, 1.0)
    if pad > 0:
        shift = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device=gen_device)
        shift = shift.to(images.device)
        padded = F.pad(out, (pad, pad, pad, pad), mode="replicate")  # (N, 3, H+2p, W+2p)
        rows = shift[:, :1] + torch.arange(h, device=images.device)  # (N, H)
        cols = shift[:, 1:] + torch.arange(w, device=images.device)  # (N, W)
        idx = torch.arange(n, device=images.device).view(n, 1, 1)
        out = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]]  # (N, H, W, 3)
        out = out.permute(0, 3, 1, 2).contiguous()
    return out


# --------------------------------------------------------------------------- pooling


class AttentionPool(nn.Module):
    """A learned query cross-attends over a token set, then an MLP: (N, P, C) -> (N, out_dim).

    ``extra`` tokens (N, E, C), e.g. the projected proprio state, are appended to the keys and
    values so the pooled vision summary can depend on the robot's state (ICRT's combine step).

    The parameters are those of ordinary multi-head attention (query, q, kv, proj), but with a
    single, input-independent query the key and value projections fold into the query side:
    score_i = (W_k^T q) . x_i per head (the key bias shifts all scores equally and cancels), and
    out = W_v (sum_i a_i x_i) + b_v. That costs O(P * C * heads) instead of O(P * C * 2C) and
    keeps no (P, 2C) key/value activations for backward; :meth:`forward_reference` is the
    textbook computation it equals.
    """

    def __init__(self, in_dim: int, out_dim: int, num_heads: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        if in_dim % num_heads:
            raise UserError(
                f"--model-cfg.policy-cfg.adapter-num-heads ({num_heads}) must divide the vision "
                f"feature width {in_dim}."
            )
        self.num_heads = num_heads
        self.query = nn.Parameter(torch.zeros(1, 1, in_dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.q = nn.Linear(in_dim, in_dim)
        self.kv = nn.Linear(in_dim, 2 * in_dim)
        self.proj = nn.Linear(in_dim, in_dim)
        hidden = max(1, int(in_dim * mlp_ratio))
        self.norm = nn.LayerNorm(in_dim)
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, in_dim))
        self.out = nn.Linear(in_dim, out_dim)

    def _head(self, x: Tensor) -> Tensor:
        """Attention output (N, C) -> pooled feature (N, out_dim)."""
        x = self.proj(x)
        x = x + self.mlp(self.norm(x))
        return self.out(x)

    def forward(self, tokens: Tensor, extra: Tensor | None = None) -> Tensor:
        n, _, c = tokens.shape
        h, d = self.num_heads, c // self.num_heads
        q = self.q(self.query.view(1, c)).view(h, d) * d**-0.5  # (h, d), scaled
        w_k, w_v = self.kv.weight[:c].view(h, d, c), self.kv.weight[c:].view(h, d, c)
        u = torch.einsum("hd,hdc->hc", q, w_k)  # (h, C): the query in token space
        parts = [tokens] if extra is None else [tokens, extra]
        scores = torch.cat([torch.einsum("npc,hc->nph", x, u) for x in parts], dim=1)
        attn = scores.softmax(dim=1)  # (N, P + E, h)
        a_parts = attn.split([x.shape[1] for x in parts], dim=1)
        pooled = sum(
            torch.einsum("nph,npc->nhc", a, x) for a, x in zip(a_parts, parts, strict=True)
        )  # (N, h, C)
        out = torch.einsum("nhc,hdc->nhd", pooled, w_v).reshape(n, c) + self.kv.bias[c:]
        return self._head(out)  # (N, out_dim)

    def forward_reference(self, tokens: Tensor, extra: Tensor | None = None) -> Tensor:
        """Plain multi-head cross-attention with the same weights (for tests)."""
        if extra is not None:
            tokens = torch.cat([tokens, extra], dim=1)  # (N, P + E, C)
        n, p, c = tokens.shape
        h = self.num_heads
        q = self.q(self.query).expand(n, -1, -1)  # (N, 1, C)
        q = q.view(n, 1, h, c // h).transpose(1, 2)  # (N, h, 1, C/h)
        k, v = self.kv(tokens).view(n, p, 2, h, c // h).permute(2, 0, 3, 1, 4)  # (N, h, P, C/h)
        x = F.scaled_dot_product_attention(q, k, v)  # (N, h, 1, C/h)
        return self._head(x.transpose(1, 2).reshape(n, c))


def _mlp(in_dim: int, out_dim: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))


def feature_key(camera_key: str) -> str:
    """Store key of a camera's cached features: ``image_agentview`` -> ``feature_agentview``."""
    return "feature_" + camera_key.removeprefix("image_")


# --------------------------------------------------------------------------- state tokens


class ObservationEncoder(nn.Module):
    """Builds one state token per timestep from camera images and proprioception.

    With cameras: every camera's tokens are layer-normed, optionally tagged with a learned
    camera embedding, and pooled together with a proprio token (MLP of the low-dim state, as
    ICRT's ``combine_forward``) by attention pooling, one adapter per camera (each producing
    ``d_model // n_cameras``, zero-padded to ``d_model``) or one shared adapter over all
    cameras' tokens. Without cameras the state token is an MLP of the proprio vector.

    The vision encoder always exists, also when training from cached features, so the same
    module runs on live camera frames at deployment.
    """

    def __init__(
        self,
        vision_cfg: VisionEncoderConfig,
        policy_cfg: PolicyConfig,
        camera_keys: Sequence[str],
        proprio_dim: int,
        d_model: int,
        vision_aug: bool,
        aug_pad: int = 4,
    ) -> None:
        super().__init__()
        self.camera_keys = tuple(camera_keys)
        self.proprio_dim = int(proprio_dim)
        self.d_model = int(d_model)
        self.vision_aug = bool(vision_aug)
        self.aug_pad = int(aug_pad)
        self.use_cached_features = vision_cfg.use_cached_features
        self.use_proprio = self.proprio_dim > 0 and not policy_cfg.remove_proprio
        n_cam = len(self.camera_keys)

        if n_cam == 0:  # low-dim only: no vision modules at all
            if not self.use_proprio:
                raise UserError(
                    "State tokens need camera images or low-dim observations, but the dataset "
                    "has no image keys and proprio is empty or removed "
                    "(--model-cfg.policy-cfg.remove-proprio)."
                )
            self.lowdim_mlp = _mlp(self.proprio_dim, self.d_model, self.d_model)
            return

        self.vision = VisionEncoder(vision_cfg)
        if self.use_cached_features and not self.vision.frozen:
            raise UserError(
                f"{_FLAG}use-cached-features needs a frozen encoder; drop "
                f"{_FLAG}vision-lora / vision-unfreeze-last-n / vision-unfreeze-all."
            )
        c = self.vision.out_dim
        self.feature_norm = nn.LayerNorm(c)
        self.camera_emb = (
            nn.Parameter(torch.zeros(n_cam, 1, c)) if policy_cfg.camera_pos_emb else None
        )
        if self.camera_emb is not None:
            nn.init.trunc_normal_(self.camera_emb, std=0.02)
        self.proprio_mlp = _mlp(self.proprio_dim, c, c) if self.use_proprio else None
        self.separate = policy_cfg.separate_camera_adapter and n_cam > 1
        heads, ratio = policy_cfg.adapter_num_heads, policy_cfg.adapter_mlp_ratio
        if self.separate:
            per_cam = self.d_model // n_cam
            if per_cam < 1:
                raise UserError(
                    f"d_model {self.d_model} is too small for {n_cam} separate camera adapters."
                )
            self.pools = nn.ModuleList(
                AttentionPool(c, per_cam, heads, ratio) for _ in range(n_cam)
            )
        else:
            self.pools = nn.ModuleList([AttentionPool(c, self.d_model, heads, ratio)])

    @property
    def num_cameras(self) -> int:
        return len(self.camera_keys)

    def _camera_tokens(
        self, obs: Mapping[str, Tensor], key: str, train_aug: bool,
        generator: torch.Generator | None,
    ) -> Tensor:
        """Tokens (B*T, P, C) of one camera, from cached features or from pixels."""
        fkey = feature_key(key)
        if self.use_cached_features and fkey in obs:
            feats = obs[fkey]  # (B, T, P, C)
            return feats.reshape(-1, *feats.shape[-2:]).to(self.feature_norm.weight.dtype)
        if key not in obs:
            want = f"'{fkey}' or '{key}'" if self.use_cached_features else f"'{key}'"
            raise KeyError(f"observation has no {want}; it has {sorted(obs)}")
        images = obs[key]  # (B, T, H, W, 3) uint8
        x = self.vision.to_float(images.reshape(-1, *images.shape[-3:]))  # (B*T, 3, H, W)
        if train_aug and self.vision_aug:
            x = augment_images(x, generator, pad=self.aug_pad)
        return self.vision.forward_float(x)  # (B*T, P, C)

    def forward(
        self,
        obs: Mapping[str, Tensor],
        train_aug: bool = False,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """obs: ``proprio`` (B, T, D) and per camera ``image_<cam>`` (B, T, H, W, 3) uint8 or
        ``feature_<cam>`` (B, T, P, C) -> state tokens (B, T, d_model)."""
        if not self.camera_keys:
            proprio = obs["proprio"]  # (B, T, D)
            return self.lowdim_mlp(proprio)
        ref = obs.get("proprio")
        if ref is None:
            any_key = next(k for k in obs if k.startswith(("image_", "feature_")))
            ref = obs[any_key]
        b, t = ref.shape[:2]
        extra = None
        if self.proprio_mlp is not None:
            extra = self.proprio_mlp(obs["proprio"].reshape(b * t, 1, -1))  # (B*T, 1, C)
        per_cam = []
        for i, key in enumerate(self.camera_keys):
            tokens = self.feature_norm(self._camera_tokens(obs, key, train_aug, generator))
            if self.camera_emb is not None:
                tokens = tokens + self.camera_emb[i]  # (B*T, P, C)
            per_cam.append(tokens)
        if self.separate:
            out = torch.cat([pool(tok, extra) for pool, tok in zip(self.pools, per_cam,
                                                                      strict=True)], dim=-1)
            if out.shape[-1] < self.d_model:  # d_model not divisible by the camera count
                out = F.pad(out, (0, self.d_model - out.shape[-1]))
        else:
            out = self.pools[0](torch.cat(per_cam, dim=1), extra)  # (B*T, d_model)
        return out.view(b, t, self.d_model)

    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


__all__ = [
    "AttentionPool",
    "ObservationEncoder",
    "VisionEncoder",
    "augment_images",
    "encoder_id",
    "feature_key",
    "is_checkpoint_path",
    "load_checkpoint_into",
]

