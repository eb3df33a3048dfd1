"""Object pointer: the head reads the current step's objects through attention.

In a scene with several movable objects the low-dim state holds every object's pose, and the
prompt says which one to move. Acting then needs a lookup: "the pose of the object the prompt
showed". A flat MLP over the state vector has to learn that lookup per object; here it is one
attention step instead. The last low-dim key (robosuite's ``object``: 4 objects x 14 values in
the pick-and-place family) is split into ``num_slots`` equal slots; each slot, together with
the robot's own low-dim state, is encoded by one shared MLP plus a learned identity embedding,
and the backbone's feature at a state token queries the slots of that same step:

    e_i = MLP([object_i, robot]) + id_i          (one per object, shared weights)
    h' = h + W_o . attention(q = W_q LN(h), k = W_k e_i, v = W_v e_i)

The head then reads ``h'``. The backbone decides *which* object (from the prompt, through its
attention over time) and the pointer fetches *where* it is now, in the same units for every
object, so an object and a bin seen only in other pairings can still be combined.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from icrt.errors import UserError


class ObjectPointer(nn.Module):
    def __init__(self, num_slots: int, slot_dim: int, robot_dim: int, d_model: int,
                 num_heads: int = 4, hidden: int = 128, residual: bool = True):
        super().__init__()
        if d_model % num_heads:
            raise UserError(f"the object pointer needs a backbone width divisible by "
                            f"{num_heads} heads (got {d_model}).")
        self.num_slots, self.slot_dim, self.robot_dim = num_slots, slot_dim, robot_dim
        self.num_heads = num_heads
        self.residual = residual  # False: return only the attended object, not the feature too
        self.encode = nn.Sequential(nn.Linear(slot_dim + robot_dim, hidden), nn.GELU(),
                                    nn.Linear(hidden, d_model))
        self.slot_emb = nn.Parameter(torch.randn(num_slots, d_model) * 0.02)
        self.norm = nn.LayerNorm(d_model)
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def slots(self, proprio: Tensor) -> Tensor:
        """(N, P) normalised low-dim state -> (N, num_slots, D) object embeddings."""
        n, s = self.num_slots, self.slot_dim
        robot = proprio[:, : self.robot_dim]
        objects = proprio[:, proprio.shape[1] - n * s:].reshape(-1, n, s)
        x = torch.cat([objects, robot[:, None].expand(-1, n, -1)], dim=-1)
        return self.encode(x) + self.slot_emb

    def forward(self, hidden: Tensor, proprio: Tensor, with_logits: bool = False
                ) -> Tensor | tuple[Tensor, Tensor]:
        """(..., D) features at state tokens and (..., P) their steps' low-dim state ->
        (..., D) features with the attended object added (without ``residual``: the attended
        object alone) (and, ``with_logits``, the
        attention logits (N, heads, num_slots) over the flattened steps)."""
        lead = hidden.shape[:-1]
        h = hidden.reshape(-1, hidden.shape[-1]).to(self.q.weight.dtype)
        e = self.slots(proprio.reshape(-1, proprio.shape[-1]).to(h.dtype))  # (N, n, D)
        N, D = h.shape
        H, n = self.num_heads, self.num_slots
        q = self.q(self.norm(h)).view(N, H, 1, D // H)
        k = self.k(e).view(N, n, H, D // H).transpose(1, 2)  # (N, H, n, D/H)
        v = self.v(e).view(N, n, H, D // H).transpose(1, 2)
        logits = (q @ k.transpose(-1, -2))[:, :, 0] / (D // H) ** 0.5  # (N, H, n)
        r = (logits.softmax(-1)[:, :, None] @ v).reshape(N, D)
        out = self.out(r) + h if self.residual else self.out(r)
        out = out.reshape(*lead, D).to(hidden.dtype)
        return (out, logits) if with_logits else out

    @torch.no_grad()
    def weights(self, hidden: Tensor, proprio: Tensor) -> Tensor:
        """(N, D), (N, P) -> (N, num_slots) attention over the objects, averaged over heads
        (what the pointer looks at; for diagnostics)."""
        return self(hidden, proprio, with_logits=True)[1].softmax(-1).mean(1)
