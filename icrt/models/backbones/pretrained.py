"""Load a pretrained Llama checkpoint into :class:`LlamaBackbone`, optionally with LoRA.

Two directory layouts are read:

* Meta's: ``params.json`` and ``consolidated.00.pth``;
* Hugging Face's (``save_pretrained`` of ``LlamaModel`` / ``LlamaForCausalLM``, e.g.
  Llama-2-7b-hf, TinyLlama, SmolLM): ``config.json`` with ``model_type`` ``llama`` and
  ``model.safetensors`` or shards named by ``model.safetensors.index.json``. Names are mapped to
  Meta's and ``q_proj`` / ``k_proj`` are permuted back from Hugging Face's rotate-half layout
  to Meta's interleaved one, so the backbone computes what ``transformers``' ``LlamaModel``
  computes. Nothing is executed from the directory (no ``trust_remote_code``).

The token embedding and vocabulary projection (``tok_embeddings``/``embed_tokens``,
``output``/``lm_head``) and cached rotary tables are dropped: the policy feeds its own
embeddings.

Phases, as ICRT trains a pretrained Llama (``--model-cfg.policy-cfg.phase``):

* ``finetune``: peft's LoRA adapters are injected in place into all seven projections and,
  with ICRT's bias tuning, zero biases added to wq, wo, w1, w2 and w3, so the result is still
  a ``LlamaBackbone`` (same forward, same cache) whose only trainable parameters are the
  adapters, those biases and the RMSNorm weights;
* ``pretrain``: the backbone is frozen (only the policy's modules around it train);
* ``full``: every weight trains (full fine-tuning; not in ICRT).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from icrt.errors import UserError
from icrt.models.backbones.llama import PROJECTIONS, LlamaBackbone, LlamaConfig

# Checkpoint entries the backbone has no use for.
_DROPPED_PREFIXES = ("tok_embeddings.", "output.", "rope.freqs")
# ICRT's LoRA: adapters on every projection of a block, attention and feed-forward.
LORA_TARGETS = PROJECTIONS
# ICRT's bias tuning: the projections that get a trainable zero bias (wk and wv stay bias-free).
BIAS_PROJECTIONS = ("wq", "wo", "w1", "w2", "w3")
PHASES = ("pretrain", "finetune", "full")
# Hugging Face's names of the projections, and where each lives in a block.
_HF_PROJ = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo",
            "gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
_PROJ_MODULE = {p: "attention" if p in PROJECTIONS[:4] else "feed_forward" for p in PROJECTIONS}


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


# Hugging Face Llama module names -> Meta's (after the leading "model." is dropped).
_HF_RENAMES = (
    ("self_attn.q_proj", "attention.wq"),
    ("self_attn.k_proj", "attention.wk"),
    ("self_attn.v_proj", "attention.wv"),
    ("self_attn.o_proj", "attention.wo"),
    ("mlp.gate_proj", "feed_forward.w1"),
    ("mlp.down_proj", "feed_forward.w2"),
    ("mlp.up_proj", "feed_forward.w3"),
    ("input_layernorm", "attention_norm"),
    ("post_attention_layernorm", "ffn_norm"),
)
_HF_DROPPED = ("embed_tokens.", "lm_head.", "rotary_emb.")
# Llama-3.1's rope scaling, the only kind the backbone implements (llama._scale_rope_freqs).
_LLAMA31_SCALING = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}


def read_hf_llama_config(path: str | Path, max_seq_len: int) -> LlamaConfig:
    """The backbone shape of a Hugging Face ``config.json``; anything but a plain Llama-family
    model (another ``model_type``, biases, another activation or rope scaling) is refused."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"Hugging Face config '{path}' is not readable JSON ({e}).") from None
    if not isinstance(data, dict):
        raise UserError(f"Hugging Face config '{path}' must hold a JSON object.")
    kind = data.get("model_type")
    if kind != "llama":
        arch = ", ".join(data.get("architectures") or []) or "no architectures listed"
        raise UserError(f"'{path.parent}' holds a {kind or 'untyped'} model ({arch}), not a "
                        f"Llama-family one (config.json model_type 'llama').")
    missing = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if not isinstance(data.get(k), int)]
    if missing:
        raise UserError(f"Hugging Face config '{path}' lacks an integer '{missing[0]}'.")
    unsupported = [k for k in ("attention_bias", "mlp_bias") if data.get(k)]
    if data.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act {data['hidden_act']}")
    heads = data["num_attention_heads"]
    if data.get("head_dim") not in (None, data["hidden_size"] // heads):
        unsupported.append(f"head_dim {data['head_dim']}")
    rope = dict(data.get("rope_parameters") or {})
    scaling = data.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default"
                                           else None)
    scaled = False
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        scaled = kind == "llama3" and all(
            float(scaling.get(k, -1)) == v for k, v in _LLAMA31_SCALING.items())
        if not scaled:
            unsupported.append(f"rope scaling {kind} {scaling}")
    if unsupported:
        raise UserError(f"Hugging Face Llama '{path.parent}' uses {unsupported[0]}, which the "
                        f"icrt backbone does not implement.")
    try:
        return LlamaConfig(
            dim=data["hidden_size"], n_layers=data["num_hidden_layers"], n_heads=heads,
            n_kv_heads=data.get("num_key_value_heads"), norm_eps=data.get("rms_norm_eps", 1e-6),
            rope_theta=data.get("rope_theta", rope.get("rope_theta", 10000.0)),
            use_scaled_rope=scaled, intermediate_size=data["intermediate_size"],
            max_seq_len=max_seq_len)
    except ValueError as e:
        raise UserError(f"Hugging Face config '{path}' is inconsistent: {e}") from None


def _from_hf_rotary(w: Tensor, heads: int) -> Tensor:
    """Undo the permutation Hugging Face's conversion applies to q_proj / k_proj."""
    out, inp = w.shape
    return w.view(heads, 2, out // heads // 2, inp).transpose(1, 2).reshape(out, inp)


def load_hf_llama_state_dict(ckpt_dir: str | Path, cfg: LlamaConfig) -> dict[str, Tensor]:
    """The backbone part of a Hugging Face Llama directory's safetensors, under Meta's names."""
    from safetensors import SafetensorError, safe_open

    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
                AttributeError) as e:
            raise UserError(f"'{index}' is not a safetensors index ({e}).") from None
    elif (ckpt_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        bins = sorted(p.name for p in ckpt_dir.glob("pytorch_model*.bin"))
        hint = (f" (it has {bins[0]}: save it again with save_pretrained(..., "
                f"safe_serialization=True))" if bins else "")
        raise UserError(f"Hugging Face Llama '{ckpt_dir}' has no model.safetensors or "
                        f"model.safetensors.index.json{hint}.")
    state: dict[str, Tensor] = {}
    for name in files:
        path = ckpt_dir / name
        if not path.is_file():
            raise UserError(f"Shard '{path}' named by '{index}' does not exist.")
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    meta = key.removeprefix("model.")
                    if meta.startswith(_HF_DROPPED):
                        continue
                    for a, b in _HF_RENAMES:
                        meta = meta.replace(a, b)
                    t = f.get_tensor(key)
                    if meta.endswith("attention.wq.weight"):
                        t = _from_hf_rotary(t, cfg.n_heads)
                    elif meta.endswith("attention.wk.weight"):
                        t = _from_hf_rotary(t, cfg.kv_heads)
                    state[meta] = t
        except (OSError, SafetensorError, RuntimeError) as e:
            raise UserError(f"Could not read Llama weights '{path}': {e}") from None
    return state


def lora_target_pattern(layer_idxs: Sequence[int] | None,
                        targets: Sequence[str] = LORA_TARGETS) -> str:
    """peft regex (full-match on module names) selecting the projections ``targets`` (Meta's or
    Hugging Face's names) of ``layer_idxs`` (all layers when None)."""
    layers = r"\d+" if layer_idxs is None else "|".join(str(i) for i in sorted(set(layer_idxs)))
    names = sorted({_HF_PROJ.get(t, t) for t in targets})
    unknown = [t for t in names if t not in _PROJ_MODULE]
    if unknown:
        raise UserError(f"Unknown LoRA target '{unknown[0]}'; choose from "
                        f"{', '.join([*_PROJ_MODULE, *_HF_PROJ])}.")
    alts = "|".join(f"{_PROJ_MODULE[t]}\\.{t}" for t in names)
    return rf"layers\.({layers})\.({alts})"


def apply_lora(
    backbone: LlamaBackbone, rank: int, layer_idxs: Sequence[int] | None = None,
    alpha: float | None = None, dropout: float = 0.0, targets: Sequence[str] = LORA_TARGETS,
    bias: bool = True,
) -> LlamaBackbone:
    """Inject LoRA adapters (peft) into the projections ``targets`` of ``layer_idxs``, with
    ``bias`` add ICRT's zero biases to BIAS_PROJECTIONS of every layer, and freeze everything
    except the adapters, the norms and the biases. The update is scaled by alpha / rank
    (``alpha`` None: rank, i.e. 1, ICRT's). In place; returns it."""
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
    # B and the biases start at zero, so the wrapped backbone starts out computing exactly what
    # the checkpoint computes.
    if bias:
        backbone.add_biases(BIAS_PROJECTIONS)
    lora_cfg = LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha,
                          lora_dropout=dropout,
                          target_modules=lora_target_pattern(layer_idxs, targets))
    inject_adapter_in_model(lora_cfg, backbone)
    for name, p in backbone.named_parameters():
        p.requires_grad_("lora_" in name or "norm" in name or name.endswith(".bias"))
    return backbone


def load_pretrained_llama(
    ckpt_dir: str | Path,
    max_seq_len: int,
    lora_rank: int = 4,
    lora_layer_idxs: Sequence[int] | None = None,
    phase: Literal["pretrain", "finetune", "full"] = "finetune",
    lora_alpha: float | None = None,
    lora_dropout: float = 0.0,
    lora_targets: Sequence[str] = LORA_TARGETS,
    load_weights: bool = True,
    lora_bias: bool = True,
) -> LlamaBackbone:
    """A backbone with a checkpoint's weights (its shape with random weights when not
    ``load_weights``, ICRT's ``--no-load-llama``), trainable as ``phase`` says: finetune
    LoRA-wrapped (see :func:`apply_lora`), pretrain frozen (as ICRT), full all of it."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise UserError(f"Llama checkpoint directory '{ckpt_dir}' does not exist.")
    if phase not in PHASES:
        raise UserError(f"Unknown phase '{phase}'; use {', '.join(PHASES)}.")
    params = ckpt_dir / "params.json"
    if params.is_file():  # Meta's layout
        cfg = LlamaConfig.from_json(params, max_seq_len=max_seq_len)
        shard = _find_shard(ckpt_dir)
        state = load_llama_state_dict(shard) if load_weights else None
    elif (ckpt_dir / "config.json").is_file():  # Hugging Face's
        cfg = read_hf_llama_config(ckpt_dir / "config.json", max_seq_len=max_seq_len)
        shard = ckpt_dir
        state = load_hf_llama_state_dict(ckpt_dir, cfg) if load_weights else None
    else:
        raise UserError(f"Llama checkpoint directory '{ckpt_dir}' has neither params.json "
                        f"(Meta's layout) nor config.json (Hugging Face's).")
    backbone = LlamaBackbone(cfg)
    if state is not None:
        _load_checked(backbone, state, shard)
    if phase == "finetune":
        apply_lora(backbone, lora_rank, lora_layer_idxs, lora_alpha, lora_dropout, lora_targets,
                   lora_bias)
    elif phase == "pretrain":  # ICRT trains only its own modules around a pretrained Llama
        backbone.requires_grad_(False)
    return backbone


def _load_checked(backbone: LlamaBackbone, state: dict[str, Tensor], shard: Path) -> None:
    """Copy ``state`` into ``backbone`` after checking names and shapes against it."""
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise UserError(
            f"Llama checkpoint '{shard}' does not match its config: "
            f"missing {_preview(missing)}, unexpected {_preview(unexpected)}."
        )
    wrong = [k for k, v in state.items() if v.shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        raise UserError(
            f"Llama checkpoint '{shard}' does not match its config: {k} has shape "
            f"{tuple(state[k].shape)}, expected {tuple(expected[k].shape)}."
        )
    backbone.load_state_dict(state)  # copies (and casts bf16 -> fp32) into our parameters


def merge_lora(backbone: LlamaBackbone) -> int:
    """Fold every LoRA adapter into its projection's weight and drop the adapter modules (the
    backbone then computes the same function as a plain one of its config, biases included);
    returns how many were merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, module in list(backbone.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge(safe_merge=True)
            parent, _, attr = name.rpartition(".")
            setattr(backbone.get_submodule(parent), attr, module.get_base_layer())
            merged += 1
    return merged


def _preview(keys: list[str], n: int = 3) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


__all__ = [
    "BIAS_PROJECTIONS",
    "LORA_TARGETS",
    "PHASES",
    "apply_lora",
    "load_hf_llama_state_dict",
    "load_llama_state_dict",
    "load_pretrained_llama",
    "lora_target_pattern",
    "merge_lora",
    "read_hf_llama_config",
]


def hf_llama_config(cfg: LlamaConfig, **overrides: Any) -> Any:
    """The ``transformers.LlamaConfig`` of the same shape as ``cfg`` (SDPA attention), e.g. to
    compare against or export to ``transformers.LlamaModel``; its token embedding is unused,
    the backbone is fed hidden states directly. Needs ``transformers`` (the bench extra)."""
    from transformers import LlamaConfig as HFLlamaConfig

    if cfg.bias_projections:
        raise UserError(f"transformers' Llama has no biases on single projections; this backbone "
                        f"has them on {' '.join(cfg.bias_projections)}.")

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
