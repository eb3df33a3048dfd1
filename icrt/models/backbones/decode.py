"""Inference-only decoding of a :class:`LlamaBackbone`: fused weights, a static KV cache, and
bfloat16 or int8 weight-only backbones.

Acting decodes two tokens per step (the executed action's and the new state's) through every
layer, so a step reads every weight once and is bound by memory traffic and per-op overhead,
not arithmetic. The training backbone is laid out for training (seven projections per block,
nn.Module calls, a cache object per layer); :class:`Decoder` holds the same weights laid out
for decoding:

* q/k/v fused into one projection and the SwiGLU gate/up into another (4 matrix products per
  block instead of 7), rotary embeddings applied to q and k in one call, ``F.rms_norm``;
* one preallocated KV tensor per layer for keys and values, ``(L, B, Hkv, max_len, hd)``,
  written in place: nothing is allocated or concatenated per step;
* ``dtype``: ``float32``; ``bfloat16`` (weights, activations and KV cache in bf16, norms and
  rotary embeddings computed in fp32); ``int8`` (per-output-channel symmetric int8 weights,
  ``torch.ops.aten._weight_int8pack_mm`` on bf16 activations, bf16 KV cache).

The decoder copies the weights when it is built (LoRA adapters merged, through the wrapped
modules themselves; the finetune phase's biases added after each projection, fused like the
weights with zeros for the bias-free ones); :meth:`stale` tells when the backbone's
parameters changed since, so a policy can rebuild it (PPO workers load new weights every
update).

    dec = Decoder(backbone, max_len=1024, dtype="int8")
    h = dec(x_prompt)          # (1, P, D) -> (1, P, D) fp32, positions 0..P-1
    h = dec(x_step)            # (1, 2, D): positions P, P+1, attending to the cache
    dec.reset()                # forget the cached tokens (buffers kept)

Sliding-window attention (a policy trained with ``--shared-cfg.sliding-window``): the caller
passes each step's ``mask`` over the cached slots and drops the slots no later token will see
with :meth:`compact`; rotary positions keep counting (``position``), so the cache stays small
and every token is computed as in the full masked forward.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from icrt.errors import UserError
from icrt.models.backbones.llama import LlamaBackbone, apply_rope

WeightDtype = Literal["float32", "bfloat16", "int8"]
WEIGHT_DTYPES: tuple[str, ...] = ("float32", "bfloat16", "int8")


def weight_dtype_name(dtype: str | torch.dtype) -> str:
    """``"float32" | "bfloat16" | "int8"`` for a name or torch dtype; one sentence otherwise."""
    name = str(dtype).removeprefix("torch.")
    name = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "qint8": "int8"}.get(
        name, name)
    if name not in WEIGHT_DTYPES:
        raise UserError(f"Unknown backbone dtype '{dtype}'; use one of {', '.join(WEIGHT_DTYPES)}.")
    return name


def activation_dtype(weight_dtype: str) -> torch.dtype:
    """The dtype activations and the KV cache use with these weights."""
    return torch.float32 if weight_dtype == "float32" else torch.bfloat16


def _linear(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """The (out, in) matrix W and the (out,) bias b (None when it has none) of the affine map
    ``x -> W x + b`` a linear module computes, LoRA adapters included.

    A plain ``nn.Linear`` gives its parameters; a wrapped one (peft's LoRA) is applied to the
    identity and to zero, which is exactly what it computes, merged: f(0) = b and
    f(I) = W.T + b."""
    if type(module) is nn.Linear:
        b = None if module.bias is None else module.bias.detach().float()
        return module.weight.detach().float(), b
    base = getattr(module, "base_layer", module)
    n_in = base.in_features
    p = next(base.parameters())
    eye = torch.eye(n_in, device=p.device, dtype=p.dtype)
    with torch.no_grad():
        zero = module(torch.zeros_like(eye[:1])).float()  # (1, out)
        w = (module(eye).float() - zero).t().contiguous()
    return w, None if getattr(base, "bias", None) is None else zero[0]


def _fused(*linears: tuple[Tensor, Tensor | None]) -> tuple[Tensor, Tensor | None]:
    """Projections stacked along their outputs; the bias is None only when none has one
    (the bias-free ones contribute zeros)."""
    w = torch.cat([lin[0] for lin in linears])
    if all(lin[1] is None for lin in linears):
        return w, None
    return w, torch.cat([torch.zeros(len(lw), device=lw.device) if b is None else b
                         for lw, b in linears])


class _Projection:
    """One (possibly fused) projection in the decoder's weight dtype: ``w`` is the float
    weight, or the int8 weight with its per-output-channel ``scale``; ``b`` the optional bias
    in the activation dtype."""

    def __init__(self, linear: tuple[Tensor, Tensor | None], dtype: str) -> None:
        weight, bias = linear
        self.scale: Tensor | None = None
        self.b = None if bias is None else bias.to(activation_dtype(dtype)).contiguous()
        if dtype == "int8":
            scale = weight.abs().amax(1).clamp(min=1e-12) / 127.0  # symmetric, per channel
            self.w = (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8)
            self.scale = scale.to(torch.bfloat16)
        else:
            self.w = weight.to(activation_dtype(dtype)).contiguous()

    @property
    def nbytes(self) -> int:
        extra = sum(t.numel() * t.element_size() for t in (self.scale, self.b) if t is not None)
        return self.w.numel() * self.w.element_size() + extra


def _project(x: Tensor, w: Tensor, scale: Tensor | None, packed: bool,
             b: Tensor | None = None) -> Tensor:
    """x (N, in) @ w.T (+ b): float weights, or int8 weights times their scales (``packed``:
    the int8 matrix-vector kernel, else dequantised per call where the device lacks it)."""
    if scale is None:
        return F.linear(x, w, b)
    if packed:
        y = torch.ops.aten._weight_int8pack_mm(x, w, scale)
    else:
        y = F.linear(x, w.to(x.dtype)) * scale
    return y if b is None else y + b


def _block_in(h: Tensor, norm: Tensor, w: Tensor, scale: Tensor | None, b: Tensor | None,
              rope: Tensor, eps: float, B: int, H: int, Hkv: int, hd: int, packed: bool
              ) -> tuple[Tensor, Tensor, Tensor]:
    """RMSNorm, fused q/k/v projection, rotary embedding: h (B*T, D) -> q (B, H, T, hd),
    k and v (B, Hkv, T, hd)."""
    T = h.shape[0] // B
    qkv = _project(F.rms_norm(h, (h.shape[-1],), norm, eps), w, scale, packed, b)
    qkv = qkv.view(B, T, H + 2 * Hkv, hd)
    qk = apply_rope(qkv[:, :, : H + Hkv], rope)  # (B, T, H + Hkv, hd)
    return (qk[:, :, :H].transpose(1, 2), qk[:, :, H:].transpose(1, 2),
            qkv[:, :, H + Hkv:].transpose(1, 2))


def _block_out(h: Tensor, o: Tensor, wo: Tensor, so: Tensor | None, bo: Tensor | None,
               norm: Tensor, w13: Tensor, s13: Tensor | None, b13: Tensor | None, w2: Tensor,
               s2: Tensor | None, b2: Tensor | None, eps: float, packed: bool) -> Tensor:
    """Attention output projection and residual, then RMSNorm, SwiGLU and residual."""
    h = h + _project(o, wo, so, packed, bo)
    g = _project(F.rms_norm(h, (h.shape[-1],), norm, eps), w13, s13, packed, b13)
    gate, up = g.chunk(2, dim=-1)
    return h + _project(F.silu(gate) * up, w2, s2, packed, b2)


_INT8PACK: dict[str, bool] = {}


def _int8pack_ok(device: torch.device) -> bool:
    """Whether ``aten._weight_int8pack_mm`` runs on ``device`` (CPU and recent CUDA builds)."""
    key = str(device)
    if key not in _INT8PACK:
        try:
            x = torch.zeros(1, 32, dtype=torch.bfloat16, device=device)
            w = torch.zeros(8, 32, dtype=torch.int8, device=device)
            s = torch.ones(8, dtype=torch.bfloat16, device=device)
            torch.ops.aten._weight_int8pack_mm(x, w, s)
            _INT8PACK[key] = True
        except (RuntimeError, NotImplementedError):
            _INT8PACK[key] = False
    return _INT8PACK[key]


class _Block:
    def __init__(self, layer: nn.Module, dtype: str) -> None:
        att, ffn = layer.attention, layer.feed_forward
        self.qkv = _Projection(_fused(_linear(att.wq), _linear(att.wk), _linear(att.wv)), dtype)
        self.wo = _Projection(_linear(att.wo), dtype)
        self.w13 = _Projection(_fused(_linear(ffn.w1), _linear(ffn.w3)), dtype)
        self.w2 = _Projection(_linear(ffn.w2), dtype)
        act = activation_dtype(dtype)
        self.attention_norm = layer.attention_norm.weight.detach().to(act)
        self.ffn_norm = layer.ffn_norm.weight.detach().to(act)


def _param_versions(module: nn.Module) -> tuple[tuple[int, int], ...]:
    """Identity and in-place version of every parameter: changes when weights are loaded,
    stepped by an optimiser or replaced."""
    return tuple((id(p), p._version) for p in module.parameters())


class Decoder:
    """The backbone's forward for inference, with its own static KV cache (see module doc).

    ``compile``: decoding steps (one or two new tokens) run the two halves of each block
    around the attention -- norm, q/k/v projection and rotary; output projection, norm and
    SwiGLU -- through ``torch.compile`` (static shapes, elementwise work fused); attention and
    the cache writes stay eager, as does prefill. Compiles once per step shape (seconds).
    """

    def __init__(self, backbone: LlamaBackbone, max_len: int, batch_size: int = 1,
                 dtype: str | torch.dtype = "float32", compile: bool = False) -> None:
        cfg = backbone.config
        if max_len < 1:
            raise ValueError(f"Cache length {max_len} must be at least 1.")
        self.backbone = backbone
        self.weight_dtype = weight_dtype_name(dtype)
        self.dtype = activation_dtype(self.weight_dtype)
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.dim, self.eps = cfg.dim, cfg.norm_eps
        self.max_len = max_len
        self._versions = _param_versions(backbone)
        self.blocks = [_Block(layer, self.weight_dtype) for layer in backbone.layers]
        self.norm = backbone.norm.weight.detach().to(self.dtype)
        p = next(backbone.parameters())
        self.device = p.device
        self.rope = backbone._rope(p.device, max_len)  # (>= max_len, hd/2, 2) fp32
        shape = (cfg.n_layers, batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=self.dtype, device=p.device)
        self.v = torch.zeros(shape, dtype=self.dtype, device=p.device)
        self.length = 0  # filled cache slots
        self.position = 0  # rotary position of the next token (> length after compact())
        self.packed = self.weight_dtype == "int8" and _int8pack_ok(p.device)
        self._step_fns = None
        if compile:
            # one graph per (shape, dtype, step length) is compiled, and dynamo counts them per
            # function across decoders: allow more than its default 8 before it gives up
            from torch import _dynamo

            _dynamo.config.recompile_limit = max(_dynamo.config.recompile_limit, 64)
            self._step_fns = (torch.compile(_block_in, dynamic=False),
                              torch.compile(_block_out, dynamic=False))

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one decoding step reads (projections and norms)."""
        per_block = sum(b.qkv.nbytes + b.wo.nbytes + b.w13.nbytes + b.w2.nbytes
                        for b in self.blocks)
        return per_block + 2 * self.dim * self.norm.element_size() * (len(self.blocks) + 1)

    def kv_bytes(self, length: int | None = None) -> int:
        """Bytes of cached keys and values a step attending to ``length`` tokens reads."""
        n = self.length if length is None else length
        return 2 * self.k.shape[0] * self.k.shape[1] * self.n_kv_heads * n * self.head_dim \
            * self.k.element_size()

    def stale(self) -> bool:
        """True when the backbone's parameters changed since this decoder copied them."""
        return _param_versions(self.backbone) != self._versions

    def reset(self) -> None:
        """Forget every cached token (the buffers are reused)."""
        self.length = self.position = 0

    def truncate(self, n: int) -> None:
        if not 0 <= n <= self.length or self.position != self.length:
            raise ValueError(f"Cannot truncate a cache of {self.length} tokens to {n}.")
        self.length = self.position = n

    def compact(self, keep: Tensor) -> None:
        """Keep only the cached slots where ``keep`` (length,) is True, in order (sliding-window
        eviction); the keys keep their rotary positions."""
        if keep.shape != (self.length,):
            raise ValueError(f"compact() needs one flag per cached slot ({self.length}).")
        idx = keep.nonzero().flatten().to(self.k.device)
        n = len(idx)
        self.k[:, :, :, :n] = self.k[:, :, :, :self.length].index_select(3, idx)
        self.v[:, :, :, :n] = self.v[:, :, :, :self.length].index_select(3, idx)
        self.length = n

    @torch.no_grad()
    def __call__(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x (B, T, D) -> final-normed features (B, T, D) fp32, at positions
        position..position+T-1. ``mask`` (T, length + T) bool: which cached slots and new
        tokens each new token sees (default: all cached ones, the new ones causally)."""
        B, T, D = x.shape
        start, end = self.length, self.length + T
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len {self.max_len}.")
        if B != self.k.shape[1]:
            raise ValueError(f"Batch size {B} does not match the decoder's {self.k.shape[1]}.")
        if mask is not None and mask.shape != (T, end):
            raise ValueError(f"Mask of shape {tuple(mask.shape)}; expected {(T, end)}.")
        H, Hkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        p0 = self.position
        if p0 + T > self.rope.shape[0]:  # decoding past max_seq_len (windowed attention)
            self.rope = self.backbone._rope(self.device, 2 * (p0 + T))
        rope = self.rope[p0:p0 + T]
        if mask is None and start > 0 and T > 1:  # queries see keys 0..their own slot
            idx = torch.arange(end, device=x.device)
            mask = idx[None, :] <= idx[start:, None]  # (T, S)
        block_in, block_out = (self._step_fns if self._step_fns is not None and T <= 2
                               else (_block_in, _block_out))
        h = x.to(self.dtype).reshape(B * T, D)
        for i, b in enumerate(self.blocks):
            q, k, v = block_in(h, b.attention_norm, b.qkv.w, b.qkv.scale, b.qkv.b, rope,
                               self.eps, B, H, Hkv, hd, self.packed)
            self.k[i, :, :, start:end] = k
            self.v[i, :, :, start:end] = v
            k, v = self.k[i, :, :, :end], self.v[i, :, :, :end]  # (B, Hkv, S, hd)
            if mask is not None:
                o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                   enable_gqa=Hkv != H)
            else:  # prefill from empty (causal) or one query that sees everything
                o = F.scaled_dot_product_attention(q, k, v, is_causal=start == 0 and T > 1,
                                                   enable_gqa=Hkv != H)
            h = block_out(h, o.transpose(1, 2).reshape(B * T, H * hd), b.wo.w, b.wo.scale,
                          b.wo.b, b.ffn_norm, b.w13.w, b.w13.scale, b.w13.b, b.w2.w, b.w2.scale,
                          b.w2.b, self.eps, self.packed)
        self.length = end
        self.position = p0 + T
        return F.rms_norm(h, (D,), self.norm, self.eps).float().view(B, T, D)
