"""Named model presets (``scripts/train.py --preset NAME``): backbone size, action head,
encoder and the few data settings that belong to a model family, as flags.

A preset is a list of ordinary flags applied on top of the defaults (or of ``--load-config``);
flags given on the command line override it one by one, so ``--preset act-mini
--shared-cfg.num-pred-steps 50`` is ACT with 50-step chunks. The table in docs/training.md is
:func:`presets_markdown`'s output (a test keeps them equal).

Families:

* ``icrt-*``: the in-context policy (prompt + query in one context), ICRT's recipe.
* ``act-*``: ACT-style behaviour cloning, trained without prompts: the current observation only
  (sliding window 1), 20-step chunks, L1 with ACT's conditional-VAE KL term (weight 10,
  ``--model-cfg.policy-cfg.cvae-kl-weight 0`` drops it); acts with temporal ensembling.
* ``diffusion-*``: diffusion-policy-style behaviour cloning, trained without prompts: two
  observation steps (sliding window 2), 16-step chunks from a DDIM diffusion head (100 training
  steps, 10 when sampling); evaluate with ``--execution open_loop --open-loop-steps 8`` as
  diffusion policy does.
"""

from __future__ import annotations

from dataclasses import dataclass

from icrt.errors import UserError


@dataclass(frozen=True)
class Preset:
    description: str
    flags: tuple[str, ...]


_P = "--model-cfg.policy-cfg."
_V = "--model-cfg.vision-encoder-cfg."


def _backbone(size: str) -> tuple[str, ...]:
    return (_P + "scratch-llama-config", f"config/model_config/{size}.json")


def _icrt(size: str) -> tuple[str, ...]:
    return (*_backbone(size), "--shared-cfg.prompt", "--shared-cfg.sliding-window", "None")


_ACT = ("--shared-cfg.no-prompt", "--shared-cfg.sliding-window", "1",
        "--shared-cfg.num-pred-steps", "20", _P + "decoder-pred-head", "cvae",
        _P + "cvae-latent-dim", "32", _P + "cvae-kl-weight", "10")
_DIFFUSION = ("--shared-cfg.no-prompt", "--shared-cfg.sliding-window", "2",
              "--shared-cfg.num-pred-steps", "16", _P + "decoder-pred-head", "diffusion",
              _P + "num-train-diffusion-steps", "100", _P + "num-inference-diffusion-steps",
              "10", _P + "diffusion-sampler", "ddim")

PRESETS: dict[str, Preset] = {
    "icrt-tiny": Preset("in-context, 64x2 backbone (0.1M), L1 chunk head, 4-step chunks",
                        (*_icrt("tiny"), _P + "decoder-pred-head", "mlp",
                         "--shared-cfg.num-pred-steps", "4")),
    "icrt-mini": Preset("in-context, 128x4 backbone (1M), L1 chunk head, 4-step chunks "
                        "(the MW5 demo's model)",
                        (*_icrt("mini"), _P + "decoder-pred-head", "mlp",
                         "--shared-cfg.num-pred-steps", "4")),
    "icrt-small": Preset("in-context, ICRT's 768x12 backbone (85M), L1 chunk head, 16-step "
                         "chunks, ICRT's MAE ViT-B/16 encoder for cameras",
                         (*_icrt("small"), _P + "decoder-pred-head", "mlp",
                          "--shared-cfg.num-pred-steps", "16", _V + "vision-encoder",
                          "vit_base_patch16_224.mae")),
    "icrt-small-diffusion": Preset("icrt-small with a DDIM diffusion head",
                                   (*_icrt("small"), _P + "decoder-pred-head", "diffusion",
                                    "--shared-cfg.num-pred-steps", "16")),
    "icrt-mini-resnet18": Preset("icrt-mini with a ResNet-18 camera encoder trained end to end "
                                 "(GroupNorm, random init; diffusion policy's encoder)",
                                 (*_icrt("mini"), _P + "decoder-pred-head", "mlp",
                                  "--shared-cfg.num-pred-steps", "4", _V + "vision-encoder",
                                  "resnet18", _V + "vision-nonpretrained",
                                  _V + "vision-unfreeze-all", _V + "vision-group-norm")),
    "act-mini": Preset("ACT-style behaviour cloning (no prompt, window 1, 20-step chunks, "
                       "CVAE), 128x4 backbone", (*_backbone("mini"), *_ACT)),
    "act-small": Preset("ACT-style behaviour cloning, 768x12 backbone",
                        (*_backbone("small"), *_ACT)),
    "diffusion-mini": Preset("diffusion-policy-style behaviour cloning (no prompt, window 2, "
                             "16-step DDIM chunks), 128x4 backbone",
                             (*_backbone("mini"), *_DIFFUSION)),
    "diffusion-small": Preset("diffusion-policy-style behaviour cloning, 768x12 backbone",
                              (*_backbone("small"), *_DIFFUSION)),
}


def preset_flags(name: str) -> tuple[str, ...]:
    """The flags preset ``name`` stands for."""
    if name not in PRESETS:
        import difflib

        close = difflib.get_close_matches(name, list(PRESETS), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UserError(f"Unknown preset '{name}'{hint}; presets: {', '.join(PRESETS)}.")
    return PRESETS[name].flags


def presets_help() -> str:
    """The presets as lines for ``-h``."""
    width = max(map(len, PRESETS))
    return "\n".join(f"  {n:<{width}}  {p.description}" for n, p in PRESETS.items())


def presets_markdown() -> str:
    """The presets as the Markdown table of docs/training.md."""
    rows = ["| preset | what it is | flags |", "| --- | --- | --- |"]
    for name, p in PRESETS.items():
        rows.append(f"| `{name}` | {p.description} | `{' '.join(p.flags)}` |")
    return "\n".join(rows)
