"""InContextPolicy: the KV-cached path equals full recomputation; prompts, resets, overflow."""

import numpy as np
import pytest
import torch
from helpers import make_reach_dataset
from test_train import tiny_args

from icrt.config import parse_config
from icrt.data.store import EpisodeStore
from icrt.errors import UserError
from icrt.eval.inference import InContextPolicy
from icrt.models.backbones.pretrained import load_pretrained_llama
from icrt.train.checkpoint import load_policy, read_checkpoint, save_checkpoint
from icrt.train.loop import train


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("inference")
    data = make_reach_dataset(root, episodes_per_task=6)
    out = {}
    for head in ("mlp", "diffusion"):
        out[head] = train(parse_config(tiny_args(data, root / head, "--trainer-cfg.epochs", "1",
                                                 "--model-cfg.policy-cfg.decoder-pred-head",
                                                 head)), progress=False)
    return root, out


def _rollout(policy, query, episodes=2):
    actions = []
    for ep in range(episodes):
        policy.reset(seed=ep)
        for t in range(len(query["state"])):
            actions.append(policy.act({"state": query["state"][t]}))
    return np.array(actions)


@pytest.mark.parametrize("head", ["mlp", "diffusion"])
@pytest.mark.parametrize("execution", ["ensemble", "open_loop"])
def test_cached_actions_equal_full_recompute(runs, head, execution):
    root, paths = runs
    store = EpisodeStore.open(root / "reach.zarr")
    demos, query = [store.episode(0), store.episode(1)], store.episode(7)
    cached = InContextPolicy.from_checkpoint(paths[head], execution=execution, seed=1)
    full = InContextPolicy.from_checkpoint(paths[head], execution=execution, seed=1,
                                           use_cache=False)
    for p in (cached, full):
        p.prompt(demos)
    a, b = _rollout(cached, query), _rollout(full, query)
    # the context (2 x 48 tokens) overflows during these episodes: both slide alike
    assert len(cached._tokens) > cached.max_tokens and cached._offset > 0
    np.testing.assert_allclose(a, b, atol=1e-4)
    assert a.shape == (2 * len(query["state"]), 2)


def test_reset_reuses_prompt_and_is_reproducible(runs):
    root, paths = runs
    store = EpisodeStore.open(root / "reach.zarr")
    policy = InContextPolicy.from_checkpoint(paths["diffusion"], seed=0)
    policy.prompt([store.episode(0)])
    query = store.episode(3)
    first = _rollout(policy, query, episodes=1)
    second = _rollout(policy, query, episodes=1)
    np.testing.assert_array_equal(first, second)
    policy.reset(seed=5)
    other = [policy.act({"state": query["state"][t]}) for t in range(len(query["state"]))]
    assert not np.allclose(first, np.array(other))  # a different seed samples differently


def test_prompt_changes_actions_and_no_prompt_works(runs):
    root, paths = runs
    store = EpisodeStore.open(root / "reach.zarr")
    query = store.episode(2)
    policy = InContextPolicy.from_checkpoint(paths["mlp"])
    policy.prompt([])
    no_prompt = _rollout(policy, query, episodes=1)
    policy.prompt([store.episode(0)])
    prompted = _rollout(policy, query, episodes=1)
    assert not np.allclose(no_prompt, prompted)


def test_open_loop_executes_chunks(runs):
    root, paths = runs
    store = EpisodeStore.open(root / "reach.zarr")
    policy = InContextPolicy.from_checkpoint(paths["mlp"], execution="open_loop",
                                             open_loop_steps=4)
    calls = []
    original = policy.model.predict_chunk
    policy.model.predict_chunk = lambda *a, **k: calls.append(1) or original(*a, **k)
    policy.prompt([store.episode(0)])
    query = store.episode(2)
    for t in range(8):
        policy.act({"state": query["state"][t]})
    assert len(calls) == 2


def test_errors(runs):
    root, paths = runs
    policy = InContextPolicy.from_checkpoint(paths["mlp"], overflow="error")
    store = EpisodeStore.open(root / "reach.zarr")
    with pytest.raises(UserError, match="lacks key.*state"):
        policy.act({"proprio": np.zeros(3)})
    with pytest.raises(UserError, match="Prompt demonstration 0 lacks key.*action"):
        policy.prompt([{"state": store.episode(0)["state"]}])
    with pytest.raises(UserError, match="exceeds this policy's 96"):
        policy.prompt([store.episode(i) for i in range(6)])
    with pytest.raises(UserError, match="not a checkpoint directory"):
        InContextPolicy.from_checkpoint(root / "nothing")
    with pytest.raises(UserError, match="open_loop_steps"):
        InContextPolicy.from_checkpoint(paths["mlp"], execution="open_loop", open_loop_steps=9)
    assert torch.is_grad_enabled()


def test_prompt_embedding_marks_prompt_tokens(runs, tmp_path):
    root, _ = runs
    run = train(parse_config(tiny_args(root / "reach.json", tmp_path / "pe", "--trainer-cfg."
                                       "epochs", "1", "--model-cfg.policy-cfg.prompt-pos-emb")),
                progress=False)
    store = EpisodeStore.open(root / "reach.zarr")
    cached = InContextPolicy.from_checkpoint(run)
    full = InContextPolicy.from_checkpoint(run, use_cache=False)
    for p in (cached, full):
        p.prompt([store.episode(0)])
    query = store.episode(4)
    np.testing.assert_allclose(_rollout(cached, query, 1), _rollout(full, query, 1), atol=1e-4)
    assert "prompt_emb" in dict(cached.model.named_parameters())
    # the embedding is added to prompt tokens only
    assert not torch.allclose(cached._prompt_tokens[0], cached.model.state_tokens(
        cached._obs_tensors({"state": store.episode(0)["state"][:1]}, 1))[0, 0])


def test_bf16_backbone_acts_like_float32(runs):
    root, paths = runs
    store = EpisodeStore.open(root / "reach.zarr")
    query = store.episode(3)
    acts = []
    for dtype in ("float32", "bfloat16"):
        policy = InContextPolicy.from_checkpoint(paths["mlp"], dtype=dtype)
        policy.prompt([store.episode(0)])
        acts.append(_rollout(policy, query, episodes=1))
    assert policy._decoder.weight_dtype == "bfloat16" and policy._decoder.k.dtype == torch.bfloat16
    np.testing.assert_allclose(acts[0], acts[1], atol=0.1)


@pytest.mark.parametrize("head", ["mlp", "diffusion"])
def test_batched_rows_act_as_single_policies(runs, head):
    """Rows with prompts of different lengths (one none), episodes of different lengths, a row
    idle while others act, a row restarted mid-way and contexts that slide: every row's
    actions equal its own InContextPolicy's."""
    from icrt.eval.inference import BatchedInContextPolicy

    root, paths = runs
    store = EpisodeStore.open(root / "reach.zarr")
    prompts = [[store.episode(0), store.episode(1)], [], [store.episode(4)]]
    # (row, episode) -> query; row 1 runs two episodes, the second starting while others act
    plan = {0: [store.episode(7)], 1: [store.episode(2), store.episode(8)],
            2: [store.episode(5)]}
    batch = BatchedInContextPolicy.from_checkpoint(paths[head], rows=3, seed=1)
    singles = [InContextPolicy.from_checkpoint(paths[head], seed=1) for _ in range(3)]
    for i in range(3):
        batch.prompt(i, prompts[i])
        singles[i].prompt(prompts[i])
    episode, step = [0, 0, 0], [0, 0, 0]
    for i in range(3):
        batch.reset(i, seed=10 * i)
        singles[i].reset(seed=10 * i)
    got = {i: [] for i in range(3)}
    want = {i: [] for i in range(3)}
    tick, slid = 0, False
    while any(episode[i] < len(plan[i]) for i in range(3)):
        obs = [None] * 3
        for i in range(3):
            idle = i == 2 and tick % 3 == 1  # row 2 sits out some steps
            if episode[i] < len(plan[i]) and not idle:
                obs[i] = {"state": plan[i][episode[i]]["state"][step[i]]}
        actions = batch.act(obs)
        for i in range(3):
            if obs[i] is None:
                assert actions[i] is None
                continue
            got[i].append(actions[i])
            want[i].append(singles[i].act(obs[i]))
            slid = slid or singles[i]._offset > 0
            step[i] += 1
            if step[i] == len(plan[i][episode[i]]["state"]):
                episode[i], step[i] = episode[i] + 1, 0
                batch.reset(i, seed=10 * i + episode[i])
                singles[i].reset(seed=10 * i + episode[i])
        tick += 1
    assert slid  # some row's context slid during an episode
    for i in range(3):
        np.testing.assert_allclose(np.array(got[i]), np.array(want[i]), atol=1e-4)


def test_hugging_face_llama_dir_trains_with_lora_and_acts_cached(runs, tmp_path):
    """A Llama saved by transformers' save_pretrained as the pretrained backbone: a LoRA
    finetune run trains, reloads, and its KV-cached prompted actions equal recomputation."""
    transformers = pytest.importorskip("transformers")
    root, _ = runs
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=16, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )).save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    run = train(parse_config(tiny_args(
        root / "reach.json", tmp_path / "run", "--trainer-cfg.epochs", "1",
        "--model-cfg.policy-cfg.scratch-llama-config", "None",
        "--model-cfg.policy-cfg.llama-ckpt-dir", tmp_path / "hf",
        "--model-cfg.policy-cfg.phase", "finetune", "--model-cfg.policy-cfg.lora-rank", "2")),
        progress=False)
    cached = InContextPolicy.from_checkpoint(run)
    full = InContextPolicy.from_checkpoint(run, use_cache=False)
    names = [n for n, _ in cached.model.backbone.named_parameters()]
    assert any("lora_" in n for n in names)  # the finetune phase's adapters came back
    assert cached.model.backbone.config.ffn_hidden_dim == 96
    store = EpisodeStore.open(root / "reach.zarr")
    for p in (cached, full):
        p.prompt([store.episode(0)])
    query = store.episode(4)
    np.testing.assert_allclose(_rollout(cached, query, 1), _rollout(full, query, 1), atol=1e-4)


def test_lora_checkpoint_holds_adapters_only_and_merged_export_acts_the_same(runs, tmp_path):
    """A LoRA run on a pretrained Llama directory saves only what trains (adapters, ICRT's
    biases, norms) plus its base's fingerprint; it refuses another base; with non-zero biases
    and adapters, cached actions equal recomputed ones and the merged export stands alone and
    acts the same."""
    transformers = pytest.importorskip("transformers")
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root, _ = runs
    base = tmp_path / "base"
    config = transformers.LlamaConfig(
        vocab_size=16, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(base)
    run = train(parse_config(tiny_args(
        root / "reach.json", tmp_path / "run", "--trainer-cfg.epochs", "1",
        "--model-cfg.policy-cfg.scratch-llama-config", "None",
        "--model-cfg.policy-cfg.llama-ckpt-dir", base, "--model-cfg.policy-cfg.phase",
        "finetune", "--model-cfg.policy-cfg.lora-rank", "2", "--model-cfg.policy-cfg.lora-alpha",
        "16", "--model-cfg.policy-cfg.lora-targets", "q_proj", "v_proj", "w1", "w2", "w3")),
        progress=False)
    ckpt = sorted(run.glob("checkpoint-*"))[-1]
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "model.safetensors"))
    backbone = [k for k in saved if k.startswith("backbone.")]
    assert backbone and all("lora_" in k or "norm" in k or k.endswith(".bias") for k in backbone)
    assert any("feed_forward.w2.lora_A" in k for k in backbone)  # MLP targets took
    assert not any("attention.wk.lora_" in k for k in backbone)
    biased = {k.split(".")[4] for k in backbone if k.endswith(".bias")}  # wrapped or not
    assert biased == {"wq", "wo", "w1", "w2", "w3"}
    assert all(saved[k].abs().sum() > 0 for k in backbone if k.endswith(".bias"))  # trained
    assert json.loads((ckpt / "lora_base.json").read_text())["path"] == str(base.resolve())
    # training left the base weights bitwise as the base directory has them
    fresh = load_pretrained_llama(base, 64, phase="pretrain").state_dict()
    model, _ = load_policy(run)
    for k, v in model.backbone.state_dict().items():
        if "lora_" not in k and "norm" not in k and not k.endswith(".bias"):
            assert torch.equal(v, fresh[k.replace(".base_layer", "")]), k
    # biases and adapters far from zero, so a bias folded in wrongly shows; saved trainable-only
    torch.manual_seed(2)
    with torch.no_grad():
        for n, p in model.backbone.named_parameters():
            if "lora_B" in n or n.endswith(".bias"):
                p.normal_(std=0.1)
    source = read_checkpoint(run)
    perturbed = save_checkpoint(tmp_path / "perturbed", model, source.config, source.normalizer)
    assert set(load_file(str(perturbed / "model.safetensors"))) == set(saved)
    policy = InContextPolicy.from_checkpoint(perturbed)
    full = InContextPolicy.from_checkpoint(perturbed, use_cache=False)
    for k, v in policy.model.state_dict().items():  # the reload holds the perturbed weights
        assert torch.equal(v, model.state_dict()[k]), k
    store = EpisodeStore.open(root / "reach.zarr")
    query = store.episode(4)
    for p in (policy, full):
        p.prompt([store.episode(0)])
    unmerged = _rollout(policy, query, 1)
    np.testing.assert_allclose(unmerged, _rollout(full, query, 1), atol=1e-4)
    # the merged export: no base directory, no LoRA modules, same actions
    script = Path(__file__).resolve().parents[1] / "scripts" / "export.py"
    subprocess.run([sys.executable, str(script), "--checkpoint", str(perturbed), "--out",
                    str(tmp_path / "export"), "--merge-lora"], check=True, capture_output=True)
    shape = json.loads((tmp_path / "export" / "backbone_params.json").read_text())
    assert shape["bias_projections"] == ["wq", "wo", "w1", "w2", "w3"]
    shutil.rmtree(base)
    merged = InContextPolicy.from_checkpoint(tmp_path / "export")
    assert not any("lora_" in n for n, _ in merged.model.named_parameters())
    merged.prompt([store.episode(0)])
    np.testing.assert_allclose(_rollout(merged, query, 1), unmerged, atol=1e-5)
    # a LoRA checkpoint refuses a base with other weights, in one sentence
    torch.manual_seed(1)
    transformers.LlamaForCausalLM(config).save_pretrained(base)
    with pytest.raises(UserError, match="holds LoRA adapters trained on the base model .* has "
                                        "other weights"):
        InContextPolicy.from_checkpoint(run)


def test_pretrain_phase_freezes_a_pretrained_llama_and_its_checkpoint_reloads(runs, tmp_path):
    """ICRT's pretrain phase on a pretrained Llama trains only the policy's modules around the
    frozen backbone: the checkpoint leaves the backbone to its base directory, reloads to the
    same actions, and exports standalone; the full phase trains (and saves) every weight."""
    transformers = pytest.importorskip("transformers")
    import dataclasses
    import shutil

    from icrt.models.policy import ICRTPolicy
    from icrt.train.checkpoint import export_checkpoint, load_checkpoint_weights, lora_base_keys

    root, _ = runs
    base = tmp_path / "base"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=16, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )).save_pretrained(base)
    run = train(parse_config(tiny_args(
        root / "reach.json", tmp_path / "run", "--trainer-cfg.epochs", "1",
        "--model-cfg.policy-cfg.scratch-llama-config", "None",
        "--model-cfg.policy-cfg.llama-ckpt-dir", base)), progress=False)
    ckpt = sorted(run.glob("checkpoint-*"))[-1]
    from safetensors.torch import load_file

    saved = load_file(str(ckpt / "model.safetensors"))
    assert saved and not any(k.startswith("backbone.") for k in saved)
    assert (ckpt / "lora_base.json").is_file()
    model, source = load_policy(run)
    fresh = load_pretrained_llama(base, 64, phase="full").state_dict()
    assert model.backbone.state_dict().keys() == fresh.keys()
    assert all(torch.equal(v, fresh[k]) for k, v in model.backbone.state_dict().items())
    assert not any(p.requires_grad for p in model.backbone.parameters())
    for k, v in saved.items():  # the reload holds what was trained
        assert torch.equal(model.state_dict()[k], v), k
    store = EpisodeStore.open(root / "reach.zarr")
    query = store.episode(4)
    cached = InContextPolicy.from_checkpoint(run)
    full = InContextPolicy.from_checkpoint(run, use_cache=False)
    for p in (cached, full):
        p.prompt([store.episode(0)])
    acts = _rollout(cached, query, 1)
    np.testing.assert_allclose(acts, _rollout(full, query, 1), atol=1e-4)
    # the full phase: every backbone weight trains, so its checkpoints are complete
    cfg = source.config.model_cfg
    whole = ICRTPolicy(dataclasses.replace(cfg, policy_cfg=dataclasses.replace(
        cfg.policy_cfg, phase="full")), source.spec)
    assert all(p.requires_grad for p in whole.backbone.parameters())
    assert not lora_base_keys(whole) and lora_base_keys(model)
    # ICRT's pretrain-then-finetune on the same base: the checkpoint initialises a LoRA policy
    # (pretrained-path), which starts out computing what the pretrained one computes
    tuned = ICRTPolicy(dataclasses.replace(cfg, policy_cfg=dataclasses.replace(
        cfg.policy_cfg, phase="finetune")), source.spec).eval()
    load_checkpoint_weights(tuned, source)
    x = torch.randn(1, 6, 64)
    with torch.no_grad():
        torch.testing.assert_close(tuned.backbone(x), model.backbone(x))
    assert all(torch.equal(tuned.state_dict()[k], v) for k, v in saved.items())
    export_checkpoint(run, tmp_path / "export", merge_lora=True)
    shutil.rmtree(base)
    standalone = InContextPolicy.from_checkpoint(tmp_path / "export")
    standalone.prompt([store.episode(0)])
    np.testing.assert_allclose(_rollout(standalone, query, 1), acts, atol=1e-5)
