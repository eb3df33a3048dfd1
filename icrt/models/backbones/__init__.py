"""Sequence backbones: a Llama-style causal transformer, from scratch or pretrained."""

from __future__ import annotations

from icrt.config import PolicyConfig
from icrt.models.backbones.llama import KVCache, LlamaBackbone, LlamaConfig
from icrt.models.backbones.pretrained import load_pretrained_llama

# The one backbone type so far; an alias so callers need not name the architecture.
Backbone = LlamaBackbone


def build_backbone(policy_cfg: PolicyConfig, max_seq_len: int) -> Backbone:
    """The policy's backbone: a randomly initialised Llama of the shape in
    ``scratch_llama_config`` (takes precedence; ICRT's small shape by default; the policy
    LoRA-wraps it in the finetune phase), else the pretrained checkpoint in ``llama_ckpt_dir``
    (LoRA-wrapped in the finetune phase, frozen in pretrain, trainable in full).
    ``backbone.d_model`` is its width.
    """
    if policy_cfg.scratch_config is not None:
        cfg = LlamaConfig.from_json(policy_cfg.scratch_config, max_seq_len=max_seq_len)
        return LlamaBackbone(cfg, gradient_checkpointing=policy_cfg.gradient_checkpointing)
    assert policy_cfg.llama_ckpt_dir is not None  # scratch_config is None only then
    backbone = load_pretrained_llama(
        policy_cfg.llama_ckpt_dir,
        max_seq_len=max_seq_len,
        lora_rank=policy_cfg.lora_rank,
        lora_layer_idxs=policy_cfg.lora_layer_idxs,
        phase=policy_cfg.phase,
        lora_alpha=policy_cfg.lora_alpha,
        lora_dropout=policy_cfg.lora_dropout,
        lora_targets=policy_cfg.lora_targets,
        load_weights=policy_cfg.load_llama,
        lora_bias=policy_cfg.lora_bias,
    )
    backbone.gradient_checkpointing = policy_cfg.gradient_checkpointing
    return backbone


__all__ = [
    "Backbone",
    "KVCache",
    "LlamaBackbone",
    "LlamaConfig",
    "build_backbone",
    "load_pretrained_llama",
]
