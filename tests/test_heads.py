"""Action heads: every head in the registry trains, masks, samples and reproduces."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from icrt.config import PolicyConfig
from icrt.errors import UserError
from icrt.models.heads import HEADS, ActionHead, build_head
from icrt.models.heads.base import fill_masked_steps, masked_step_mean

D, A, K, N = 24, 3, 4, 32  # feature width, action dim, chunk length, dataset size
BASE = dataclasses.replace(
    PolicyConfig(scratch_llama_config="config/model_config/tiny.json"),
    head_hidden_dim=64,
    head_num_layers=2,
    num_train_diffusion_steps=50,
    num_inference_diffusion_steps=10,
    flow_num_steps=8,
)

# Every registered head with its defaults, plus option variants that change training.
CASES: list[tuple[str, dict[str, Any]]] = [(name, {}) for name in HEADS] + [
    ("mlp", {"mlp_loss": "l2"}),
    ("diffusion", {"diffusion_prediction_type": "sample", "diffusion_sampler": "ddpm"}),
    ("diffusion", {"diffusion_prediction_type": "v_prediction", "diffusion_eta": 0.5}),
    ("flow", {"flow_scheduler": "cosine"}),
]
CASE_IDS = [name + "".join(f"-{v}" for v in opts.values()) for name, opts in CASES]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The heads' ops are tiny: with 2 OpenMP threads on a busy 2-core machine the
    synchronisation costs ~10x the work, so this module runs single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_head(name: str, seed: int = 0, **opts: Any) -> ActionHead:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(BASE, decoder_pred_head=name, **opts)
    return build_head(cfg, d_model=D, action_dim=A, num_pred_steps=K)


def dataset() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(123)
    hidden = torch.randn(N, D, generator=g)
    target = torch.rand(N, K, A, generator=g) * 2 - 1  # normalised actions in [-1, 1]
    mask = torch.ones(N, K, dtype=torch.bool)
    mask[: N // 4, K - 1] = False  # some chunks run past the episode end
    return hidden, target, mask


def eval_loss(
    head: ActionHead, hidden: torch.Tensor, target: torch.Tensor, mask: torch.Tensor
) -> float:
    """Mean loss over a few fixed seeds (the generative losses draw noise and times)."""
    vals = []
    with torch.no_grad():
        for seed in range(4):
            torch.manual_seed(seed)
            vals.append(head.loss(hidden, target, mask).mean().item())
    return sum(vals) / len(vals)


Trained = dict[str, tuple[ActionHead, float, float]]


@pytest.fixture(scope="module")
def trained() -> Trained:
    """Each case overfitted on the tiny dataset once: (head, loss before, loss after)."""
    hidden, target, mask = dataset()
    out = {}
    for (name, opts), case_id in zip(CASES, CASE_IDS, strict=True):
        head = make_head(name, **opts)
        before = eval_loss(head, hidden, target, mask)
        opt = torch.optim.Adam(head.parameters(), lr=3e-3)
        torch.manual_seed(1)
        for _ in range(400):
            loss = head.loss(hidden, target, mask).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[case_id] = (head.eval(), before, eval_loss(head, hidden, target, mask))
    return out


# ---------------------------------------------------------------------------- registry


def test_registry_and_unknown_name() -> None:
    assert {"mlp", "gmm", "diffusion", "flow"} <= set(HEADS)
    for name, cls in HEADS.items():
        assert isinstance(make_head(name), cls)
    with pytest.raises(UserError, match="known heads: .*mlp"):
        build_head(dataclasses.replace(BASE, decoder_pred_head="nope"), D, A, K)


def test_helpers() -> None:
    per_step = torch.tensor([[1.0, 3.0, float("nan")], [5.0, 5.0, 5.0]])
    mask = torch.tensor([[True, True, False], [False, False, False]])
    torch.testing.assert_close(masked_step_mean(per_step, mask), torch.tensor([2.0, 0.0]))
    target = torch.arange(1.0, 5.0).view(1, 4, 1).repeat(2, 1, 1)  # steps 1, 2, 3, 4
    mask = torch.tensor([[True, False, True, False], [False, True, True, True]])
    filled = fill_masked_steps(target, mask).squeeze(-1)
    torch.testing.assert_close(filled, torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 2.0, 3.0, 4.0]]))


# ----------------------------------------------------------------------- loss and masks


@pytest.mark.parametrize("name", list(HEADS))
def test_loss_shape_and_empty_mask(name: str) -> None:
    head = make_head(name)
    hidden, target, mask = dataset()
    mask[0] = False  # a sample with no valid step at all
    loss = head.loss(hidden, target, mask)
    assert loss.shape == (N,)
    assert torch.isfinite(loss).all()
    assert loss[0].item() == 0.0
    loss.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", list(HEADS))
def test_masked_targets_do_not_matter(name: str) -> None:
    head = make_head(name)
    hidden, target, mask = dataset()
    changed = target.clone()
    changed[~mask] = 100.0  # garbage in the padding
    losses = []
    for t in (target, changed):
        torch.manual_seed(7)  # same diffusion times and noise for both
        losses.append(head.loss(hidden, t, mask))
    torch.testing.assert_close(losses[0], losses[1])
    changed[mask] += 0.5  # ... while the valid steps do matter
    torch.manual_seed(7)
    assert not torch.allclose(head.loss(hidden, changed, mask), losses[0])


# ------------------------------------------------------------------------- overfitting


@pytest.mark.parametrize("case", CASE_IDS)
def test_overfit_loss_decreases(trained: Trained, case: str) -> None:
    _, before, after = trained[case]
    assert after < before - 0.5 * abs(before), (before, after)


@pytest.mark.parametrize("case", CASE_IDS)
def test_overfit_samples_near_targets(trained: Trained, case: str) -> None:
    head, _, _ = trained[case]
    hidden, target, mask = dataset()
    g = torch.Generator().manual_seed(0)
    guess_err = ((torch.rand(target.shape, generator=g) * 2 - 1) - target).abs()[mask].mean()
    det = head.sample(hidden, deterministic=True)
    sampled = head.sample(hidden, generator=g)
    det_err = (det - target).abs()[mask].mean()
    sample_err = (sampled - target).abs()[mask].mean()
    if not head.stochastic:
        assert det_err < 0.05, det_err
        torch.testing.assert_close(det, sampled)
    else:
        assert det_err < 0.3 * guess_err, (det_err, guess_err)
        assert sample_err < 0.5 * guess_err, (sample_err, guess_err)


@pytest.mark.parametrize("solver", ["euler", "midpoint", "rk4", "dopri5"])
def test_flow_solvers(trained: Trained, solver: str) -> None:
    head, _, _ = trained["flow"]
    hidden, target, mask = dataset()
    default = head.sampler
    head.sampler = dataclasses.replace(default, method=solver)
    try:
        out = head.sample(hidden, generator=torch.Generator().manual_seed(0), deterministic=True)
    finally:
        head.sampler = default
    assert out.shape == (N, K, A) and torch.isfinite(out).all()
    assert (out - target).abs()[mask].mean() < 0.25


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_diffusion_samplers(trained: Trained, sampler: str) -> None:
    head, _, _ = trained["diffusion"]
    hidden, target, mask = dataset()
    default = head.sampler
    head.sampler = dataclasses.replace(default, sampler_type=sampler)
    try:
        out = head.sample(hidden, generator=torch.Generator().manual_seed(0))
    finally:
        head.sampler = default
    assert out.shape == (N, K, A) and torch.isfinite(out).all()
    assert (out - target).abs()[mask].mean() < 0.35


# ---------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("name", list(HEADS))
def test_sample_shape_and_reproducible(name: str) -> None:
    head = make_head(name).eval()
    hidden = torch.randn(5, D)
    a = head.sample(hidden, generator=torch.Generator().manual_seed(3))
    torch.randn(100)  # global RNG state must not matter
    b = head.sample(hidden, generator=torch.Generator().manual_seed(3))
    assert a.shape == (5, K, A) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(
        head.sample(hidden, deterministic=True), head.sample(hidden, deterministic=True)
    )
    if head.stochastic:
        c = head.sample(hidden, generator=torch.Generator().manual_seed(4))
        assert not torch.allclose(a, c)


@pytest.mark.parametrize(
    "opts",
    [
        {"diffusion_sampler": "ddpm"},
        {"diffusion_sampler": "ddim"},
        {"diffusion_beta_schedule": "linear", "diffusion_prediction_type": "sample"},
        {"diffusion_prediction_type": "v_prediction", "diffusion_eta": 1.0},
        {"flow_scheduler": "vp"},
        {"flow_scheduler": "linear_vp"},
    ],
)
def test_path_options_train_and_sample(opts: dict[str, Any]) -> None:
    """Options outside the overfit cases build, give a finite loss and sample finite chunks
    (the variance-preserving flow paths' velocities are large near t = 0: too slow to overfit
    in the overfit tests' budget)."""
    head = make_head("flow" if "flow_scheduler" in opts else "diffusion", **opts)
    hidden, target, mask = dataset()
    assert torch.isfinite(head.loss(hidden, target, mask)).all()
    out = head.sample(torch.randn(3, D), generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, K, A) and torch.isfinite(out).all()
