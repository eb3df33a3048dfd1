"""Action heads, registered by name (``--model-cfg.policy-cfg.decoder-pred-head``).

Adding a head: write a module with an :class:`ActionHead` subclass and add one line to
``HEADS``.
"""

from __future__ import annotations

from icrt.config import PolicyConfig
from icrt.errors import UserError
from icrt.models.heads.base import ActionHead
from icrt.models.heads.cvae import CVAEHead
from icrt.models.heads.diffusion import DiffusionHead
from icrt.models.heads.flow import FlowHead
from icrt.models.heads.gmm import GMMHead
from icrt.models.heads.mlp import MLPHead

HEADS: dict[str, type[ActionHead]] = {
    "mlp": MLPHead,
    "gmm": GMMHead,
    "diffusion": DiffusionHead,
    "flow": FlowHead,
    "cvae": CVAEHead,
}


def build_head(cfg: PolicyConfig, d_model: int, action_dim: int, num_pred_steps: int) -> ActionHead:
    """The head named by ``cfg.decoder_pred_head``."""
    name = cfg.decoder_pred_head
    if name not in HEADS:
        raise UserError(f"Unknown action head '{name}'; known heads: {', '.join(sorted(HEADS))}.")
    return HEADS[name](d_model, action_dim, num_pred_steps, cfg)


__all__ = [
    "HEADS",
    "ActionHead",
    "CVAEHead",
    "DiffusionHead",
    "FlowHead",
    "GMMHead",
    "MLPHead",
    "build_head",
]
