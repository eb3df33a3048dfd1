"""Micro-benchmarks of icrt's building blocks against reference implementations.

Each function returns a list of result rows (plain dicts) so scripts can print them as a
table or dump them as JSON.
"""

from __future__ import annotations

import statistics
import time

import torch


def benchmark_backbone_train(
    config_path: str,
    batch_size: int,
    seq_len: int,
    steps: int,
    warmup: int,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[dict]:
    """Time forward+backward of our LlamaBackbone against ``transformers.LlamaModel``.

    Both models get the same shape (from the params file), the same random
    ``(batch_size, seq_len, dim)`` input embeddings and the loss ``out.float().pow(2).mean()``.
    Timed steps alternate between the two models so that drifting machine load (thermal
    throttling, other jobs) hits both equally. Returns one row per model with ``ms_per_step``
    (median), ``tokens_per_s`` and ``relative_speed`` (tokens/s relative to transformers).
    """
    from transformers import LlamaConfig as HFLlamaConfig
    from transformers import LlamaModel

    from icrt.models.backbones.llama import LlamaBackbone, LlamaConfig

    if steps < 1 or warmup < 0 or batch_size < 1 or seq_len < 1:
        raise ValueError("steps, batch_size and seq_len must be >= 1 and warmup >= 0.")
    cfg = LlamaConfig.from_json(config_path, max_seq_len=seq_len)
    dev = torch.device(device)
    torch.manual_seed(0)
    ours = LlamaBackbone(cfg).to(device=dev, dtype=dtype).train()
    hf_cfg = HFLlamaConfig(
        vocab_size=8,
        hidden_size=cfg.dim,
        intermediate_size=cfg.ffn_hidden_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        max_position_embeddings=seq_len,
        attn_implementation="sdpa",
        use_cache=False,
    )
    theirs = LlamaModel(hf_cfg).to(device=dev, dtype=dtype).train()
    x = torch.randn(batch_size, seq_len, cfg.dim, device=dev, dtype=dtype)

    def run_ours() -> None:
        ours(x).float().pow(2).mean().backward()

    def run_theirs() -> None:
        out = theirs(inputs_embeds=x, use_cache=False).last_hidden_state
        out.float().pow(2).mean().backward()

    def timed(model: torch.nn.Module, fn: object) -> float:
        model.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    runs = {"icrt": (ours, run_ours), "transformers": (theirs, run_theirs)}
    for _ in range(warmup):
        for model, fn in runs.values():
            timed(model, fn)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(steps):
        # Alternate which model goes first too, so neither always follows the other.
        order = list(runs) if i % 2 == 0 else list(reversed(runs))
        for name in order:
            times[name].append(timed(*runs[name]))

    tokens = batch_size * seq_len
    rows = []
    for name, (model, _) in runs.items():
        sec = statistics.median(times[name])
        rows.append(
            {
                "model": name,
                # transformers' 8-row token embedding is unused (inputs_embeds) and not counted.
                "params": sum(
                    p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n
                ),
                "batch_size": batch_size,
                "seq_len": seq_len,
                "device": str(dev),
                "dtype": str(dtype).removeprefix("torch."),
                "ms_per_step": 1000.0 * sec,
                "tokens_per_s": tokens / sec,
            }
        )
    ref = rows[1]["tokens_per_s"]
    for row in rows:
        row["relative_speed"] = row["tokens_per_s"] / ref
    return rows
