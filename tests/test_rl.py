"""PPO fine-tuning (icrt.rl.ppo): likelihoods, the first ratio, critic warm-up, learning, resume."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_train import tiny_args

from icrt.config import CollectConfig, EvalConfig, PolicyConfig, parse_config
from icrt.data.collect import collect
from icrt.data.store import EpisodeStore
from icrt.envs.base import make_env
from icrt.errors import UserError
from icrt.eval.inference import InContextPolicy
from icrt.eval.rollout import evaluate
from icrt.models.heads import build_head
from icrt.rl.ppo import (
    ChunkDistribution,
    PPOConfig,
    PPOLearner,
    _RLEpisode,
    episode_features,
    episode_rewards,
    finetune,
    gae,
    run_rl_episode,
)
from icrt.train.checkpoint import load_policy
from icrt.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A weak imitation policy of the toy point-reach task (2 epochs of a tiny model)."""
    root = tmp_path_factory.mktemp("rl")
    collect(CollectConfig(env="toy", tasks=("point-reach",), episodes_per_task=24,
                          prompt_episodes_per_task=4, out=str(root / "toy.zarr"), workers=1),
            progress=False)
    run = train(parse_config(tiny_args(root / "toy.json", root / "il", "--trainer-cfg.epochs",
                                       "2", "--shared-cfg.seq-length", "24")), progress=False)
    return root, run


def _cfg(root, run, out, **kw):
    base = dict(il_ckpt_path=str(run), prompt_dataset=str(root / "toy_prompts.json"),
                output_dir=str(out), num_train_processes=1, episodes_per_update=4,
                num_minibatches=2, ppo_epochs=2, max_updates=1, critic_warmup_updates=0,
                val_every=0)
    return PPOConfig(**{**base, **kw})


def test_rollout_log_probs_match_a_full_recomputation(toy):
    root, run = toy
    model, ckpt = load_policy(run)
    dist = ChunkDistribution(model.head, -1.6, True)
    demos = EpisodeStore.open(root / "toy_prompts.zarr")
    env = make_env("toy", "point-reach")
    cached = InContextPolicy(model, ckpt)  # what the rollout workers use
    prompt = [demos.episode(i) for i in range(3)]
    ep = run_rl_episode(cached, dist, env, _RLEpisode("point-reach", 0, 5, 7, ()), prompt)
    # the context (24 timesteps) overflows: the episode spans several context windows
    assert len(np.unique(ep["offsets"])) > 1
    full = InContextPolicy(model, ckpt, use_cache=False)
    with torch.no_grad():
        h = episode_features(full, ep, prompt)
        lp = dist.log_prob(h, torch.from_numpy(ep["chunks"]))
    np.testing.assert_allclose(lp.numpy(), ep["log_probs"], atol=1e-3, rtol=1e-5)
    # the log-density is the Gaussian's: a chunk drawn at the mean scores highest
    mean = model.head.net(h).view_as(torch.from_numpy(ep["chunks"]))
    assert (dist.log_prob(h, mean) > lp).all()


def test_gmm_likelihood_is_the_heads_own():
    head = build_head(PolicyConfig(decoder_pred_head="gmm"), 16, 3, 4)
    dist = ChunkDistribution(head, -1.0, True)
    assert dist.log_std is None  # no extra parameter: the mixture is the distribution
    h = torch.randn(5, 16)
    chunk, lp = dist.sample(h, torch.Generator().manual_seed(0))
    mask = torch.ones(5, 4, dtype=torch.bool)
    np.testing.assert_allclose(lp.numpy(), (-4 * head.loss(h, chunk, mask)).detach().numpy(),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("head", ["diffusion", "flow"])
def test_heads_without_a_likelihood_are_refused(head):
    with pytest.raises(UserError, match=f"{head} head, whose likelihood is intractable"):
        ChunkDistribution(build_head(PolicyConfig(decoder_pred_head=head), 16, 3, 4), -1.0, True)


def test_first_minibatch_ratio_is_one_and_warmup_freezes_the_actor(toy, tmp_path):
    root, run = toy
    out = finetune(_cfg(root, run, tmp_path / "a", max_updates=2, critic_warmup_updates=1,
                        val_every=1, val_episodes=3), progress=False)
    start, warm, first = out["history"]
    assert start["update"] == 0 and "success_rate" not in start
    assert warm["critic_warmup"] and "policy_loss" not in warm and warm["value_loss"] > 0
    assert first["first_minibatch_max_ratio_dev"] < 1e-3
    # validation acts with the mean: the frozen actor of the warm-up validates as the start
    assert warm["val_success/point-reach"] == start["val_success/point-reach"]
    # warm-up only: the actor is bitwise the imitation policy, the critic has learned
    out1 = finetune(_cfg(root, run, tmp_path / "w", critic_warmup_updates=1), progress=False)
    assert out1["history"][0]["critic_warmup"]
    il = load_file(str(Path(load_policy(run)[1].path) / "model.safetensors"))
    rl = load_file(str(tmp_path / "w" / "checkpoint-1" / "model.safetensors"))
    assert il.keys() == rl.keys() and all(torch.equal(il[k], rl[k]) for k in il)
    state = torch.load(tmp_path / "w" / "checkpoint-1" / "train_state.pt", weights_only=True)
    assert torch.equal(state["log_std"], torch.full_like(state["log_std"], -1.6))
    # after a real update the actor moved
    moved = load_file(str(tmp_path / "a" / "checkpoint-2" / "model.safetensors"))
    assert any(not torch.equal(il[k], moved[k]) for k in il)
    # the checkpoint is evaluated like any other
    res = evaluate(EvalConfig(checkpoint=str(tmp_path / "a"), prompt_dataset=str(
        root / "toy_prompts.json"), episodes_per_task=2, workers=1), progress=False)
    assert res["tasks"]["point-reach"]["episodes"] == 2
    assert (tmp_path / "a" / "success_curve.png").stat().st_size > 1000


def test_bad_inputs_are_one_sentence(toy, tmp_path):
    root, run = toy
    with pytest.raises(UserError, match="--num-train-processes must be at least 1"):
        _cfg(root, run, tmp_path / "x", num_train_processes=0)
    with pytest.raises(UserError, match="trained on toy data, not metaworld"):
        finetune(_cfg(root, run, tmp_path / "x", env="metaworld"), progress=False)
    with pytest.raises(UserError, match="Unknown toy task 'reach-v3'"):
        finetune(_cfg(root, run, tmp_path / "x", tasks=("reach-v3",)), progress=False)
    with pytest.raises(UserError, match="not a checkpoint directory"):
        finetune(_cfg(root, tmp_path / "nothing", tmp_path / "x"), progress=False)
    finetune(_cfg(root, run, tmp_path / "y"), progress=False)
    with pytest.raises(UserError, match="holds a PPO run with other settings \\(clip\\)"):
        finetune(_cfg(root, run, tmp_path / "y", clip=0.2, max_updates=2), progress=False)


def test_an_update_raises_the_likelihood_of_better_than_expected_chunks(toy):
    """The direction of learning: after one update on fixed rollouts, the drawn chunks with a
    positive advantage became more likely relative to those with a negative one (a sign or
    bookkeeping error in the surrogate, GAE or the log-probabilities fails this)."""
    root, run = toy
    model, ckpt = load_policy(run)
    cfg = _cfg(root, run, root / "unused", bc_coef=0.0, actor_lr=1e-4, ppo_epochs=2,
               num_minibatches=1, reward="shaped", shaped_reward_scale=1.0)
    learner = PPOLearner(InContextPolicy(model, ckpt, use_cache=False), cfg)
    cached = InContextPolicy(model, ckpt)
    stores = EpisodeStore.open(root / "toy_prompts.zarr")
    env = make_env("toy", "point-reach")
    episodes = []
    for i in range(6):
        ep = run_rl_episode(cached, learner.dist, env, _RLEpisode(
            "point-reach", i, 100 + i, 7 + i, ((str(root / "toy_prompts.zarr"), 0),)),
            [stores.episode(0)])
        episodes.append(ep)
    with torch.no_grad():  # advantages as the update sees them, before it
        advs = []
        for ep in episodes:
            h = episode_features(learner.policy, ep, learner.demos(ep))
            tf = torch.arange(ep["length"], dtype=torch.float32) / ep["max_steps"]
            v = learner.critic(learner.critic_input(ep, h), tf).numpy()
            advs.append(gae(episode_rewards(ep, cfg), v, cfg.gamma, cfg.gae_lambda))
    flat = np.concatenate(advs)
    learner.update(episodes, update=0, actor_frozen=False)
    with torch.no_grad():
        new_lp = np.concatenate([learner.dist.log_prob(
            episode_features(learner.policy, ep, learner.demos(ep)),
            torch.from_numpy(ep["chunks"])).numpy() for ep in episodes])
    delta = new_lp - np.concatenate([ep["log_probs"] for ep in episodes])
    centred = flat - flat.mean()
    assert float(np.mean(centred * delta)) > 0, "the update moved against the advantages"
    assert delta[centred > 0].mean() > delta[centred < 0].mean()


@pytest.mark.slow
def test_resume_after_kill_continues_exactly(toy, tmp_path):
    root, run = toy
    args = [sys.executable, str(ROOT / "scripts" / "finetune_rl.py"), "--il-ckpt-path", str(run),
            "--prompt-dataset", str(root / "toy_prompts.json"), "--num-train-processes", "1",
            "--episodes-per-update", "4", "--num-minibatches", "2", "--ppo-epochs", "2",
            "--max-updates", "4", "--critic-warmup-updates", "1", "--actor-lr", "1e-4",
            "--val-every", "2", "--val-episodes", "2"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    subprocess.run([*args, "--output-dir", str(tmp_path / "ref")], check=True, env=env,
                   capture_output=True)
    proc = subprocess.Popen([*args, "--output-dir", str(tmp_path / "cut")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 120
    while not (tmp_path / "cut" / "checkpoint-2").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the learner and its rollout workers
    proc.wait()
    assert not (tmp_path / "cut" / "checkpoint-4").exists()
    subprocess.run([*args, "--output-dir", str(tmp_path / "cut")], check=True, env=env,
                   capture_output=True)
    a = load_file(str(tmp_path / "ref" / "checkpoint-4" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint-4" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ha = json.loads((tmp_path / "ref" / "checkpoint-4" / "rl_history.json").read_text())
    hb = json.loads((tmp_path / "cut" / "checkpoint-4" / "rl_history.json").read_text())
    assert [h.get("success_rate") for h in ha] == [h.get("success_rate") for h in hb]
    assert [h.get("val_success") for h in ha] == [h.get("val_success") for h in hb]
    assert "val_success" in ha[0] and "val_success" in ha[-1]
    assert [h["env_steps"] for h in ha] == [h["env_steps"] for h in hb]
