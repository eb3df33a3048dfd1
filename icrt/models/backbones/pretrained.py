"""Load a Meta-format Llama checkpoint into :class:`LlamaBackbone`, optionally with LoRA.

A Meta checkpoint directory holds ``params.json`` and ``consolidated.00.pth``. The token
embedding and vocabulary projection (``tok_embeddings``, ``output``) and the cached rotary
table of older releases (``rope.freqs``) are dropped: the policy feeds its own embeddings.

For the ``finetune`` phase peft's LoRA adapters are injected in place into the attention
projections, so the result is still a ``LlamaBackbone`` (same forward, same cache) whose only
trainable parameters are the adapters, the RMSNorm weights and biases (Llama has none).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from icrt.errors import UserError
from icrt.models.backbones.llama import LlamaBackbone, LlamaConfig

# Checkpoint entries the backbone has no use for.
_DROPPED_PREFIXES = ("tok_embeddings.", "output.", "rope.freqs")
# The attention projections that get LoRA adapters.
LORA_TARGETS = ("wq", "wk", "wv", "wo")


def _find_shard(ckpt_dir: Path) -> Path:
    shards = sorted(ckpt_dir.glob("consolidated.*.pth"))
    if not shards:
        raise UserError(f"Llama checkpoint directory '{ckpt_dir}' has no consolidated.*.pth.")
    if len(shards) > 1:
        raise UserError(
            f"Llama checkpoint directory '{ckpt_dir}' has {len(shards)} model-parallel shards; "
            "only single-shard checkpoints (consolidated.00.pth) are supported."
        )
    return shards[0]


def load_llama_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The backbone part of a Meta ``consolidated.*.pth`` (memory-mapped, on CPU)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # corrupt file, pickle from another format, ...
        raise UserError(f"Could not read Llama checkpoint '{path}': {e}") from None
    if not isinstance(sd, dict):
        raise UserError(f"Llama checkpoint '{path}' does not hold a state dict.")
    return {k: v for k, v in sd.items() if not k.startswith(_DROPPED_PREFIXES)}


def lora_target_pattern(layer_idxs: Sequence[int] | None) -> str:
    """peft regex (full-match on module names) selecting the attention projections of
    ``layer_idxs`` (all layers when None)."""
    layers = r"\d+" if layer_idxs is None else "|".join(str(i) for i in sorted(set(layer_idxs)))
    return rf"layers\.({layers})\.attention\.({'|'.join(LORA_TARGETS)})"


def apply_lora(
    backbone: LlamaBackbone, rank: int, layer_idxs: Sequence[int] | None = None
) -> LlamaBackbone:
    """Inject LoRA adapters (peft) into the attention projections of ``layer_idxs`` and
    freeze everything except the adapters, the norms and any biases. In place; returns it."""
    from peft import LoraConfig, inject_adapter_in_model

    n_layers = backbone.config.n_layers
    if layer_idxs is not None:
        bad = [i for i in layer_idxs if not 0 <= i < n_layers]
        if bad or not layer_idxs:
            raise UserError(
                f"LoRA layer indices {list(layer_idxs)} must be non-empty and within "
                f"[0, {n_layers - 1}] for this {n_layers}-layer backbone."
            )
    if rank < 1:
        raise UserError(f"LoRA rank must be >= 1 (got {rank}).")
    # peft's defaults otherwise (lora_alpha=8, no dropout, B initialised to zero so the
    # wrapped backbone starts out computing exactly what the checkpoint computes).
    lora_cfg = LoraConfig(r=rank, target_modules=lora_target_pattern(layer_idxs))
    inject_adapter_in_model(lora_cfg, backbone)
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name or "norm" in name or name.endswith(".bias"))
    return backbone


def load_pretrained_llama(
    ckpt_dir: str | Path,
    max_seq_len: int,
    lora_rank: int = 4,
    lora_layer_idxs: Sequence[int] | None = None,
    phase: Literal["pretrain", "finetune"] = "finetune",
) -> LlamaBackbone:
    """A backbone with a Meta checkpoint's weights; LoRA-wrapped when ``phase`` is finetune,
    fully trainable when it is pretrain."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise UserError(f"Llama checkpoint directory '{ckpt_dir}' does not exist.")
    params = ckpt_dir / "params.json"
    if not params.is_file():
        raise UserError(f"Llama checkpoint directory '{ckpt_dir}' has no params.json.")
    if phase not in ("pretrain", "finetune"):
        raise UserError(f"Unknown phase '{phase}'; use pretrain or finetune.")
    cfg = LlamaConfig.from_json(params, max_seq_len=max_seq_len)
    shard = _find_shard(ckpt_dir)
    state = load_llama_state_dict(shard)
    backbone = LlamaBackbone(cfg)
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"Llama checkpoint '{shard}' does not match its params.json: "
            f"missing {_preview(missing)}, unexpected {_preview(unexpected)}."
        )
    wrong = [k for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        raise UserError(
            f"Llama checkpoint '{shard}' does not match its params.json: {k} has shape "
            f"{tuple(state[k].shape)}, expected {tuple(expected[k].shape)}."
        )
    backbone.load_state_dict(state)  # copies (and casts bf16 -> fp32) into our parameters
    if phase == "finetune":
        apply_lora(backbone, lora_rank, lora_layer_idxs)
    return backbone


def _preview(keys: list[str], n: int = 3) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


__all__ = [
    "LORA_TARGETS",
    "apply_lora",
    "load_llama_state_dict",
    "load_pretrained_llama",
    "lora_target_pattern",
]


def hf_llama_config(cfg: LlamaConfig, **overrides: Any) -> Any:
    """The ``transformers.LlamaConfig`` of the same shape as ``cfg`` (SDPA attention), e.g. to
    compare against or export to ``transformers.LlamaModel``; its token embedding is unused,
    the backbone is fed hidden states directly. Needs ``transformers`` (the bench extra)."""
    from transformers import LlamaConfig as HFLlamaConfig

    kwargs = dict(
        vocab_size=8,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        max_position_embeddings=cfg.max_seq_len,
        attn_implementation="sdpa",
    )
    return HFLlamaConfig(**{**kwargs, **overrides})
