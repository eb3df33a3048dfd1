"""A Llama-2-style causal transformer over precomputed embeddings, with a KV cache.

The policy embeds states and actions itself, so the backbone has no token embedding and no
vocabulary head: it maps ``(B, T, D)`` embeddings to ``(B, T, D)`` features. Everything else
follows Meta's ``llama/model.py`` -- pre-norm RMSNorm blocks, interleaved-pair rotary
embeddings, SwiGLU feed-forward with the same hidden-size rounding, grouped-query attention
-- and the parameter names mirror Meta's checkpoints (``layers.{i}.attention.wq``, ...), so a
``consolidated.00.pth`` state dict without ``tok_embeddings``/``output`` loads directly.

Attention runs through ``flash_attn_func`` when flash-attn is importable and the tensors are
fp16/bf16 on CUDA, and through ``torch.nn.functional.scaled_dot_product_attention``
otherwise; both give the same results up to numerics.

    backbone = LlamaBackbone(LlamaConfig.from_json("config/model_config/tiny.json", 256))
    y = backbone(x)                                    # (B, T, D), positions 0..T-1
    cache = backbone.new_cache(B, 256, x.device, x.dtype)
    y0 = backbone(x[:, :10], cache)                    # prefill
    y1 = backbone(x[:, 10:11], cache)                  # decode one token (position 10)

Ragged batches (several episodes with prompts of different lengths decoded together): pass
``valid`` (B, T) to mark padding tokens. A padding token takes no position and no other token
attends to it, so every row gives what it would alone (up to numerics); see
:class:`KVCache`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from icrt.errors import UserError


def _import_flash_attn() -> Callable[..., Tensor] | None:
    """``flash_attn_func`` if flash-attn imports cleanly, else None (never raises).

    Not installed is the normal CPU case and stays quiet; an installed but broken build (missing
    CUDA symbols raise OSError/RuntimeError) is logged, since the user asked for it.
    """
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return None
    except Exception as e:
        logging.getLogger(__name__).warning(
            "flash-attn is installed but failed to import (%s: %s); attention uses "
            "scaled_dot_product_attention", type(e).__name__, e)
        return None
    return flash_attn_func


# Module-level so tests can switch it off; None means every call goes through SDPA.
_flash_attn_func = _import_flash_attn()


def attention_backend(q: Tensor) -> str:
    """Which kernel :class:`Attention` uses for queries like ``q``: "flash_attn" or "sdpa"."""
    if _flash_attn_func is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return "flash_attn"
    return "sdpa"


# --------------------------------------------------------------------------------- config

# A block's projections, by Meta's names: attention, then the SwiGLU feed-forward.
PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Backbone shape; the fields are Meta's ``params.json`` keys (minus ``vocab_size``)."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # Llama-3.1 long-context frequency scaling (params.json key of the 3.1 checkpoints).
    use_scaled_rope: bool = False
    # Longest sequence (prefill + decoded tokens) the rotary tables cover.
    max_seq_len: int = 2048
    # SwiGLU width given outright (Hugging Face configs' intermediate_size); default: Meta's
    # rounding of multiple_of and ffn_dim_multiplier.
    intermediate_size: int | None = None
    # Projections (of PROJECTIONS) that carry an additive bias. Llama has none; ICRT's bias
    # tuning (finetune phase) adds them, and a merged LoRA export keeps them.
    bias_projections: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "multiple_of", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)}).")
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads}).")
        if self.head_dim % 2:
            raise ValueError(f"dim / n_heads ({self.head_dim}) must be even for rotary embeddings.")
        if self.kv_heads < 1 or self.n_heads % self.kv_heads:
            raise ValueError(
                f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})."
            )
        for name in ("norm_eps", "rope_theta", "ffn_dim_multiplier"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0 (got {value}).")
        if self.ffn_hidden_dim < 1:
            raise ValueError(f"ffn_dim_multiplier {self.ffn_dim_multiplier} leaves the "
                             f"feed-forward layers no width.")
        unknown = [p for p in self.bias_projections if p not in PROJECTIONS]
        if unknown:
            raise ValueError(f"bias_projections names '{unknown[0]}', not one of "
                             f"{' '.join(PROJECTIONS)}.")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """SwiGLU width, rounded exactly like Meta's ``FeedForward`` (2/3 of 4*dim)."""
        if self.intermediate_size is not None:
            return self.intermediate_size
        hidden = int(2 * (4 * self.dim) / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * ((hidden + self.multiple_of - 1) // self.multiple_of)

    @classmethod
    def from_json(cls, path: str | Path, max_seq_len: int) -> LlamaConfig:
        """Read a Meta-style ``params.json``; ``vocab_size`` (and ``max_batch_size``) are
        ignored because the backbone has no vocabulary. ``max_seq_len`` comes from the
        caller, which knows the sequence length it will feed, and overrides the file."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"Llama params file '{path}' does not exist.")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"Llama params file '{path}' is not valid JSON: {e}.") from None
        if not isinstance(data, dict):
            raise UserError(f"Llama params file '{path}' must hold a JSON object.")
        ignored = {"vocab_size", "max_batch_size", "max_seq_len"}
        fields = {f.name for f in dataclasses.fields(cls)} - {"max_seq_len"}
        unknown = sorted(set(data) - fields - ignored)
        if unknown:
            raise UserError(
                f"Llama params file '{path}' has unknown key(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(fields))})."
            )
        kwargs: dict[str, Any] = {k: v for k, v in data.items() if k in fields}
        for key in ("dim", "n_layers", "n_heads"):
            if key not in kwargs:
                raise UserError(f"Llama params file '{path}' is missing the key {key}.")
        for key, value in kwargs.items():
            if not _json_value_ok(key, value):
                raise UserError(f"Llama params file '{path}': {key} has invalid value {value!r}.")
        if "bias_projections" in kwargs:
            kwargs["bias_projections"] = tuple(kwargs["bias_projections"])
        try:
            return cls(**kwargs, max_seq_len=max_seq_len)
        except ValueError as e:
            raise UserError(f"Llama params file '{path}' is inconsistent: {e}") from None


def _json_value_ok(key: str, value: Any) -> bool:
    """Type check of a params.json value (bools are not ints here)."""
    if key == "use_scaled_rope":
        return isinstance(value, bool)
    if key == "bias_projections":
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    if isinstance(value, bool):
        return False
    if key in ("n_kv_heads", "ffn_dim_multiplier") and value is None:
        return True
    if key in ("ffn_dim_multiplier", "norm_eps", "rope_theta"):
        return isinstance(value, (int, float))
    return isinstance(value, int)


# --------------------------------------------------------------------------------- rotary


def _scale_rope_freqs(freqs: Tensor) -> Tensor:
    """Llama-3.1's frequency scaling (constants of Meta's reference implementation)."""
    scale_factor, low_freq_factor, high_freq_factor, old_context_len = 8.0, 1.0, 4.0, 8192
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / freqs
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    scaled = (1 - smooth) * freqs / scale_factor + smooth * freqs
    out = torch.where(wavelen < high_freq_wavelen, freqs, scaled)
    return torch.where(wavelen > low_freq_wavelen, freqs / scale_factor, out)


def precompute_rope(cfg: LlamaConfig) -> Tensor:
    """Meta's ``precompute_freqs_cis`` stored as real pairs: (max_seq_len, head_dim // 2, 2)
    fp32 holding (cos, sin), i.e. ``torch.view_as_real(freqs_cis)``."""
    hd = cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2)[: hd // 2].float() / hd))
    if cfg.use_scaled_rope:
        freqs = _scale_rope_freqs(freqs)
    angles = torch.outer(torch.arange(cfg.max_seq_len, dtype=torch.float32), freqs)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rope(x: Tensor, rope: Tensor) -> Tensor:
    """Rotate consecutive pairs ``(x[2i], x[2i+1])`` by the angles of ``rope`` (Meta's
    complex-number convention; HF checkpoints instead permute wq/wk and rotate halves).

    x (B, T, H, hd); rope (T, hd/2, 2) or per row (B, T, hd/2, 2), fp32 (cos, sin). Computed
    in fp32 like Meta's
    reference. Eagerly, one complex multiply is ~4x faster on CPU (forward+backward) than the
    real-valued formula; under torch.compile the real formula is used because inductor does
    not generate code for complex ops but fuses the real one.
    """
    xf = x.float().unflatten(-1, (-1, 2))  # (B, T, H, hd/2, 2)
    if torch.compiler.is_compiling():
        cos, sin = rope[..., None, :, 0], rope[..., None, :, 1]  # ([B,] T, 1, hd/2)
        x0, x1 = xf.unbind(-1)  # (B, T, H, hd/2)
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    else:
        freqs_cis = torch.view_as_complex(rope)[..., None, :]  # ([B,] T, 1, hd/2) complex
        out = torch.view_as_real(torch.view_as_complex(xf) * freqs_cis)  # (B, T, H, hd/2, 2)
    return out.flatten(-2).type_as(x)


# ------------------------------------------------------------------------------- KV cache


class KVCache:
    """Preallocated per-layer keys/values for incremental decoding.

    Tensors are (B, n_kv_heads, max_len, head_dim) -- the layout SDPA wants, and a free
    transpose away from flash-attn's. Only the first ``length`` positions are valid;
    ``truncate`` just moves that mark back, so rolling back a speculative step costs nothing.
    Meant for inference (under ``torch.no_grad``).

    Rows may hold padding (ragged batches): ``valid`` (B, max_len) marks real tokens and
    ``row_length`` (B,) counts them, i.e. the rotary position each row's next token gets. Both
    are kept only once a forward passes ``valid`` (``tracked``), so dense decoding pays nothing
    for them; ``ragged`` stays False until a padding token is written, so the dense case keeps
    its mask-free attention.
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        max_len: int,
        n_kv_heads: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.row_length = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.ragged = False
        self.tracked = False
        self._length = 0

    @property
    def length(self) -> int:
        """Number of cached tokens (the position the next token gets)."""
        return self._length

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    def reset(self) -> None:
        """Forget every cached token (the buffers are reused, not freed)."""
        self._length = 0
        self.row_length.zero_()
        self.ragged = False
        self.tracked = False

    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens and drop the rest."""
        if not 0 <= n <= self._length:
            raise ValueError(f"Cannot truncate a cache of {self._length} tokens to {n}.")
        self._length = n
        if self.tracked:
            self.row_length = self.valid[:, :n].sum(1)

    def track_rows(self) -> None:
        """Start keeping per-row validity (every token so far was real)."""
        if not self.tracked:
            self.valid[:, :self._length] = True
            self.row_length.fill_(self._length)
            self.tracked = True

    def advance(self, n: int, valid: Tensor | None = None) -> None:
        """Mark ``n`` more tokens written (``valid`` (B, n): which are real, default all); the
        backbone calls this after all layers wrote."""
        if self._length + n > self.max_len:
            raise ValueError(f"KV cache overflow: {self._length} + {n} > {self.max_len} tokens.")
        new = self.valid[:, self._length:self._length + n]
        if valid is None:
            if self.tracked:
                new.fill_(True)
                self.row_length += n
        else:
            self.track_rows()
            new.copy_(valid)
            self.row_length += valid.sum(1)
            self.ragged = self.ragged or not bool(valid.all())
        self._length += n

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write ``k, v`` (B, Hkv, T, hd) after the valid tokens of ``layer`` and return
        every key/value up to and including them, (B, Hkv, length + T, hd)."""
        start, end = self._length, self._length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len {self.max_len}.")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end].to(k.dtype), self.v[layer][:, :, :end].to(v.dtype)


# --------------------------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 (Meta's ``RMSNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return out.type_as(x) * self.weight


class Attention(nn.Module):
    """Multi-head causal self-attention with rotary embeddings and grouped K/V heads."""

    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.kv_heads
        self.head_dim = cfg.head_dim
        biased = cfg.bias_projections
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias="wq" in biased)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias="wk" in biased)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias="wv" in biased)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias="wo" in biased)

    def forward(self, x: Tensor, rope: Tensor, cache: KVCache | None,
                mask: Tensor | None = None) -> Tensor:
        """``mask`` (B, 1, T, S) bool, for ragged batches: which keys each query may see."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)  # (B, T, H, hd)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)  # (B, T, Hkv, hd)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        start = 0 if cache is None else cache.length

        if mask is None and attention_backend(q) == "flash_attn":
            assert _flash_attn_func is not None
            if cache is not None:
                k_all, v_all = cache.update(self.layer_idx, k.transpose(1, 2), v.transpose(1, 2))
                k, v = k_all.transpose(1, 2), v_all.transpose(1, 2)  # (B, S, Hkv, hd)
            # flash-attn aligns the causal mask bottom-right: query i sees keys <= start + i.
            out = _flash_attn_func(q, k, v, causal=True)  # (B, T, H, hd)
            return self.wo(out.reshape(B, T, -1))

        q = q.transpose(1, 2)  # (B, H, T, hd)
        k = k.transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.transpose(1, 2)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # (B, Hkv, S, hd), S = start + T
        n_rep = self.n_heads // self.n_kv_heads
        if n_rep > 1:
            k = k.repeat_interleave(n_rep, dim=1)  # (B, H, S, hd)
            v = v.repeat_interleave(n_rep, dim=1)
        if mask is not None:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        elif start == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1)
        elif T == 1:
            out = F.scaled_dot_product_attention(q, k, v)  # one new token sees everything
        else:
            # SDPA's is_causal aligns top-left, wrong when queries start at `start`.
            S = start + T
            q_pos = torch.arange(start, S, device=q.device)
            mask = torch.arange(S, device=q.device)[None, :] <= q_pos[:, None]  # (T, S)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class FeedForward(nn.Module):
    """SwiGLU MLP: ``w2(silu(w1 x) * w3 x)``."""

    def __init__(self, dim: int, hidden_dim: int, biased: Sequence[str] = ()) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias="w1" in biased)
        self.w2 = nn.Linear(hidden_dim, dim, bias="w2" in biased)
        self.w3 = nn.Linear(dim, hidden_dim, bias="w3" in biased)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``h = x + attn(norm(x)); out = h + ffn(norm(h))``."""

    def __init__(self, cfg: LlamaConfig, layer_idx: int) -> None:
        super().__init__()
        self.attention = Attention(cfg, layer_idx)
        self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden_dim, cfg.bias_projections)
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)

    def forward(self, x: Tensor, rope: Tensor, cache: KVCache | None = None,
                mask: Tensor | None = None) -> Tensor:
        h = x + self.attention(self.attention_norm(x), rope, cache, mask)
        return h + self.feed_forward(self.ffn_norm(h))


# ------------------------------------------------------------------------------- backbone


class LlamaBackbone(nn.Module):
    """Causal transformer over embeddings: (B, T, D) -> (B, T, D), final RMSNorm applied."""

    def __init__(self, config: LlamaConfig, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        self.d_model = config.dim
        self.gradient_checkpointing = gradient_checkpointing
        self.layers = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        # A plain attribute, not a buffer: it keeps full precision when the module is cast to
        # bf16 and stays out of the state dict, so Meta checkpoints load unchanged.
        self._rope_table = precompute_rope(config)  # (max_seq_len, hd/2, 2) fp32
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2/nanoGPT init: N(0, 0.02), residual output projections (wo, w2) scaled by
        1/sqrt(2 * n_layers) so the residual stream's variance does not grow with depth;
        biases (``bias_projections``) start at zero."""
        std = 0.02
        out_std = std / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
                nn.init.normal_(p, mean=0.0, std=out_std)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    def add_biases(self, names: Sequence[str]) -> None:
        """Give the projections ``names`` (of PROJECTIONS) of every block a zero bias, so the
        backbone computes the same function until they train (ICRT's bias tuning); the config
        records them, so the shape of a saved backbone says which projections are biased."""
        unknown = [n for n in names if n not in PROJECTIONS]
        if unknown:
            raise ValueError(f"No projection '{unknown[0]}'; choose from {' '.join(PROJECTIONS)}.")
        have = set(self.config.bias_projections)
        for layer in self.layers:
            for name in sorted(set(names) - have):
                owner = layer.attention if name in PROJECTIONS[:4] else layer.feed_forward
                linear = getattr(owner, name)
                linear = getattr(linear, "base_layer", linear)  # under a peft LoRA wrapper
                w = linear.weight
                linear.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device))
        biased = have | set(names)
        self.config = dataclasses.replace(
            self.config, bias_projections=tuple(p for p in PROJECTIONS if p in biased))

    def _rope(self, device: torch.device, length: int = 0) -> Tensor:
        """The rotary table on ``device`` (moved once, like Meta's ``freqs_cis``), extended to
        at least ``length`` positions (windowed attention decodes past max_seq_len)."""
        if length > self._rope_table.shape[0]:
            longer = dataclasses.replace(self.config, max_seq_len=length)
            self._rope_table = precompute_rope(longer)
        if self._rope_table.device != device:
            self._rope_table = self._rope_table.to(device)
        return self._rope_table

    def new_cache(
        self,
        batch_size: int,
        max_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """An empty cache for ``batch_size`` sequences of up to ``max_len`` tokens (default:
        max_seq_len) on the parameters' device/dtype unless given."""
        max_len = self.config.max_seq_len if max_len is None else max_len
        if not 1 <= max_len <= self.config.max_seq_len:
            raise ValueError(
                f"Cache length {max_len} must be in [1, max_seq_len={self.config.max_seq_len}]."
            )
        p = next(self.parameters())
        return KVCache(
            self.config.n_layers,
            batch_size,
            max_len,
            self.config.kv_heads,
            self.config.head_dim,
            device=p.device if device is None else device,
            dtype=p.dtype if dtype is None else dtype,
        )

    def forward(self, x: Tensor, cache: KVCache | None = None,
                valid: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """x (B, T, D) -> (B, T, D).

        Without a cache the tokens get positions 0..T-1. With one they continue it: positions
        cache.length..cache.length+T-1, attending to the cached tokens and causally to each
        other, and their keys/values are appended.

        ``valid`` (B, T) bool (with a cache) marks padding tokens of a ragged batch: each row's
        real tokens get consecutive positions after that row's cached ones and attend only to
        that row's real tokens; a padding token's output is meaningless.

        ``mask`` (B, T, T) bool (without a cache) restricts which earlier tokens each token
        sees (windowed attention, see :func:`context_mask`); positions stay 0..T-1 and may
        pass max_seq_len, since a window bounds how far apart attending tokens are.
        """
        B, T, _ = x.shape
        start = 0 if cache is None else cache.length
        end = start + T
        if valid is not None and cache is None:
            raise ValueError("Padding tokens (valid=...) need a KV cache.")
        if valid is None and cache is not None and cache.ragged:
            valid = torch.ones(B, T, dtype=torch.bool, device=x.device)
        if mask is not None:
            if cache is not None or valid is not None:
                raise ValueError("An attention mask is for a forward without a KV cache.")
            if mask.shape != (B, T, T):
                raise ValueError(f"Attention mask of shape {tuple(mask.shape)}; expected "
                                 f"{(B, T, T)}.")
            rope = self._rope(x.device, T)[:T]
            return self._layers(x, rope, None, mask[:, None])
        if valid is None and end > self.config.max_seq_len:
            raise ValueError(
                f"Sequence reaches position {end} but max_seq_len is {self.config.max_seq_len}."
            )
        if cache is not None:
            # Checked up front so a failing call leaves every layer's cache untouched.
            if cache.batch_size != B:
                raise ValueError(f"Batch size {B} does not match the cache's {cache.batch_size}.")
            if end > cache.max_len:
                raise ValueError(f"KV cache overflow: {end} tokens > max_len {cache.max_len}.")
        mask = None
        if valid is None:
            rope = self._rope(x.device)[start:end]  # (T, hd/2, 2)
        else:
            cache.track_rows()
            pos = cache.row_length[:, None] + valid.long().cumsum(1) - 1  # (B, T)
            if int(pos.max()) >= self.config.max_seq_len:
                raise ValueError(f"A row reaches position {int(pos.max()) + 1} but max_seq_len "
                                 f"is {self.config.max_seq_len}.")
            rope = self._rope(x.device)[pos.clamp(min=0)]  # (B, T, hd/2, 2)
            keys = torch.cat([cache.valid[:, :start], valid], 1)  # (B, S)
            idx = torch.arange(end, device=x.device)
            causal = idx[None, :] <= idx[start:, None]  # (T, S)
            # a padding query sees only itself, so no row of the softmax is empty
            mask = (causal & keys[:, None, :]) | (idx[None, :] == idx[start:, None])
            mask = mask[:, None]  # (B, 1, T, S)
        h = self._layers(x, rope, cache, mask)
        if cache is not None:
            cache.advance(T, valid)
        return h

    def _layers(self, h: Tensor, rope: Tensor, cache: KVCache | None, mask: Tensor | None
                ) -> Tensor:
        use_ckpt = self.gradient_checkpointing and self.training and cache is None
        for layer in self.layers:
            if use_ckpt and torch.is_grad_enabled():
                h = checkpoint(layer, h, rope, None, mask, use_reentrant=False)
            else:
                h = layer(h, rope, cache, mask)
        return self.norm(h)


def context_mask(steps: Tensor, prompt: Tensor, context: Tensor | None = None,
                 window: int | None = None) -> Tensor | None:
    """Which earlier tokens each token sees, (B, T, T) bool, or None for plain causal.

    ``steps`` (B, T) is each token's timestep, ``prompt`` (B, T) marks prompt tokens,
    ``context`` (B, T) optional ids: tokens see only tokens with the same id (behaviour
    cloning: each trajectory on its own). With ``window`` N a token of step t sees every
    earlier prompt token but only the query tokens of steps t-N+1..t (sliding-window
    attention over the query; the prompt stays in context).
    """
    if window is None and context is None:
        return None
    T = steps.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=steps.device).tril()
    mask = causal[None].expand(steps.shape[0], T, T)
    if context is not None:
        mask = mask & (context[:, :, None] == context[:, None, :])
    if window is not None:
        near = (steps[:, :, None] - steps[:, None, :]) < window
        mask = mask & (near | prompt[:, None, :])
    return mask
