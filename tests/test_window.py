"""Sliding-window attention and prompt-free (behaviour cloning) training: the training mask
does what it says, and cached acting with a window equals full recomputation."""

import numpy as np
import pytest
import torch
from helpers import make_reach_dataset
from test_inference import _rollout
from test_train import tiny_args

from icrt.config import parse_config
from icrt.data.sequence import SequenceDataset
from icrt.data.store import EpisodeStore
from icrt.errors import UserError
from icrt.eval.inference import BatchedInContextPolicy, InContextPolicy
from icrt.models.backbones.llama import context_mask
from icrt.train.checkpoint import load_policy
from icrt.train.loop import train

WINDOW = 3


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("window")
    data = make_reach_dataset(root, episodes_per_task=6)
    out = {}
    for name, extra in (("window", ("--shared-cfg.sliding-window", WINDOW)),
                        ("bc", ("--shared-cfg.no-prompt", "--shared-cfg.sliding-window", 2))):
        out[name] = train(parse_config(tiny_args(data, root / name, "--trainer-cfg.epochs", "1",
                                                 *extra)), progress=False)
    return root, data, out


def test_context_mask_rules():
    steps = torch.arange(6).repeat_interleave(2)[None]  # s0 a0 ... s5 a5
    prompt = (steps < 2)  # steps 0, 1 are prompt
    m = context_mask(steps, prompt, window=2)[0]
    assert m[10, :4].all()  # s5 sees the whole prompt
    assert not m[10, 4:8].any() and m[10, 8:11].all()  # ... and only steps 4, 5 of the query
    assert not m[10, 11]  # causal
    ctx = torch.tensor([[0] * 6 + [1] * 6])
    m = context_mask(steps, torch.zeros_like(prompt), ctx)[0]
    assert not m[6:, :6].any() and (m[6:, 6:] == torch.ones(6, 6, dtype=torch.bool).tril()).all()
    assert context_mask(steps, prompt) is None


def test_window_hides_old_query_steps_but_not_the_prompt(runs):
    root, data, paths = runs
    model, _ = load_policy(paths["window"])
    T = 20
    g = torch.Generator().manual_seed(0)
    batch = {"proprio": torch.randn(1, T, model.spec.proprio_dim, generator=g),
             "action": torch.randn(1, T, model.spec.action_dim, generator=g),
             "prompt_mask": (torch.arange(T) < 5)[None]}

    def hidden(b):
        states = model.state_tokens(b)
        tokens = model.interleave(states, model.action_tokens(b["action"]))
        return model.backbone(tokens, mask=model.attention_mask(b))[0, 0::2]

    with torch.no_grad():
        base = hidden(batch)
        old_query = dict(batch, action=batch["action"].clone())
        old_query["action"][0, 8] += 5.0  # query step 8: outside the window of step 19
        prompt = dict(batch, action=batch["action"].clone())
        prompt["action"][0, 2] += 5.0  # a prompt step: always visible
        # layers stack windows: step t sees query steps back to t - n_layers * (W - 1) - 1
        far = 8 + model.backbone.config.n_layers * WINDOW + 1
        torch.testing.assert_close(hidden(old_query)[far:], base[far:])
        assert not torch.allclose(hidden(old_query)[9], base[9])
        assert not torch.allclose(hidden(prompt)[19], base[19])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_windowed_cache_equals_recompute(runs, dtype):
    root, _, paths = runs
    store = EpisodeStore.open(root / "reach.zarr")
    demos, query = [store.episode(0), store.episode(1)], store.episode(7)
    cached = InContextPolicy.from_checkpoint(paths["window"], seed=1, dtype=dtype)
    full = InContextPolicy.from_checkpoint(paths["window"], seed=1, dtype=dtype,
                                           use_cache=False)
    for p in (cached, full):
        p.prompt(demos)
    assert cached.window == WINDOW
    a, b = _rollout(cached, query), _rollout(full, query)
    n_prompt = len(cached._prompt_tokens)
    # episodes run past the training context (2 x 48 tokens): positions keep counting, the
    # cache holds only the prompt and the window, and nothing slides
    assert len(cached._tokens) > cached.max_tokens and cached._offset == 0
    assert cached._decoder.length <= n_prompt + 2 * WINDOW
    assert cached._decoder.position == len(cached._tokens)
    tol = 1e-4 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(a, b, atol=tol)
    with pytest.raises(UserError, match="num-envs 1"):
        BatchedInContextPolicy.from_checkpoint(paths["window"], rows=2)


def test_no_prompt_training_keeps_trajectories_apart(runs):
    root, data, paths = runs
    cfg = parse_config(tiny_args(data, root / "x", "--shared-cfg.no-prompt"))
    ds = SequenceDataset(cfg.dataset_cfg, cfg.shared_cfg)
    crossing = None
    for i in range(len(ds)):
        item = ds[i]
        assert not item["prompt_mask"].any()
        if item["episode_start"][1:].any():
            crossing = item
            break
    assert crossing is not None, "no window spans two trajectories"
    ctx = crossing["context_id"]
    first_new = int(torch.nonzero(crossing["episode_start"][1:])[0]) + 1
    assert (ctx[:first_new] == 0).all() and ctx[first_new] == 1
    model, ckpt = load_policy(paths["bc"])
    assert not model.spec.in_context and model.spec.window == 2
    policy = InContextPolicy(model, ckpt)
    store = EpisodeStore.open(root / "reach.zarr")
    with pytest.raises(UserError, match="--no-prompt"):
        policy.prompt([store.episode(0)])
    policy.prompt([])
    actions = _rollout(policy, store.episode(3), episodes=1)
    assert np.isfinite(actions).all()
