"""Training: tiny runs, checkpoints, resume, DDP equivalence, divergence stop, clear errors."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_reach_dataset
from safetensors.torch import load_file
from test_config import ICRT_COMMANDS, icrt_args

from icrt.config import ExperimentConfig, parse_config
from icrt.errors import UserError
from icrt.train.checkpoint import (
    latest_checkpoint,
    load_policy,
    read_checkpoint,
    verify_checkpoint,
)
from icrt.train.loop import TrainingDiverged, run_metrics, train

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "config/model_config/tiny.json")


def tiny_args(dataset_json, out, *extra):
    return [
        "--dataset-cfg.dataset-json", str(dataset_json),
        "--model-cfg.policy-cfg.scratch-llama-config", TINY,
        "--shared-cfg.seq-length", "48", "--shared-cfg.num-pred-steps", "4",
        "--shared-cfg.batch-size", "4", "--trainer-cfg.accum-iter", "1",
        "--trainer-cfg.epochs", "2", "--trainer-cfg.num-workers", "0",
        "--optimizer-cfg.warmup-epochs", "0.5", "--optimizer-cfg.lr", "1e-3",
        "--dataset-cfg.non-overlapping", "4", "--trainer-cfg.log-every", "1",
        "--logging-cfg.output-dir", str(out), *map(str, extra),
    ]


@pytest.fixture(scope="module")
def reach_json(tmp_path_factory):
    return make_reach_dataset(tmp_path_factory.mktemp("data"), episodes_per_task=8,
                              train_split=0.75)


def test_tiny_run_writes_checkpoint_that_reloads_identically(reach_json, tmp_path):
    cfg = parse_config(tiny_args(reach_json, tmp_path / "run"))
    run = train(cfg, progress=False)
    ckpt = run / "checkpoint-1"
    assert sorted(p.name for p in ckpt.iterdir()) == [
        "config.json", "manifest.json", "model.safetensors", "stats.json", "train_state.pt"]
    assert json.loads((run / "split.json").read_text())["val"]
    records = run_metrics(run)
    assert any("epoch/val_loss" in r for r in records)
    assert all(np.isfinite(r["train/loss"]) for r in records if "train/loss" in r)
    assert (run / "tensorboard").is_dir()
    # config.json and stats.json are plain JSON; train_state loads with weights_only
    assert json.loads((ckpt / "config.json").read_text())["shared_cfg"]["seq_length"] == 48
    torch.load(ckpt / "train_state.pt", weights_only=True)

    policy, info = load_policy(ckpt)
    assert info.config == cfg
    again, _ = load_policy(run)  # a run directory resolves to its latest checkpoint
    batch = {
        "proprio": torch.randn(2, 10, policy.spec.proprio_dim),
        "action": torch.randn(2, 10, policy.spec.action_dim),
    }
    with torch.no_grad():
        h1 = policy.backbone(policy.interleave(policy.state_tokens(batch),
                                               policy.action_tokens(batch["action"])))
        h2 = again.backbone(again.interleave(again.state_tokens(batch),
                                             again.action_tokens(batch["action"])))
    assert torch.equal(h1, h2)
    state = load_file(str(ckpt / "model.safetensors"))
    for k, v in policy.state_dict().items():
        assert torch.equal(state[k], v)


def test_loss_decreases_on_tiny_dataset(reach_json, tmp_path):
    cfg = parse_config(tiny_args(reach_json, tmp_path / "run", "--trainer-cfg.epochs", "8"))
    losses = [r["epoch/train_loss"] for r in run_metrics(train(cfg, progress=False))
              if "epoch/train_loss" in r]
    assert losses[-1] < 0.6 * losses[0]


def test_resume_reproduces_uninterrupted_losses(reach_json, tmp_path):
    args = tiny_args(reach_json, tmp_path / "full", "--trainer-cfg.epochs", "3",
                     "--shared-cfg.save-every", "1")
    full = train(parse_config(args), progress=False)
    resumed_args = tiny_args(reach_json, tmp_path / "resumed", "--trainer-cfg.epochs", "3",
                             "--shared-cfg.save-every", "1",
                             "--shared-cfg.resume", full / "checkpoint-0")
    resumed = train(parse_config(resumed_args), progress=False)
    a = {r["step"]: r["train/loss"] for r in run_metrics(full) if "train/loss" in r}
    b = {r["step"]: r["train/loss"] for r in run_metrics(resumed) if "train/loss" in r}
    assert min(b) > 1 and set(b) <= set(a)
    assert all(a[s] == b[s] for s in b), "resumed losses differ from the uninterrupted run"
    wa = load_file(str(full / "checkpoint-2" / "model.safetensors"))
    wb = load_file(str(resumed / "checkpoint-2" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(reach_json, tmp_path):
    common = ["--trainer-cfg.epochs", "4", "--shared-cfg.save-every", "1"]
    full = train(parse_config(tiny_args(reach_json, tmp_path / "full", *common)), progress=False)
    run = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "scripts/train.py"), *tiny_args(reach_json, run, *common)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while latest_checkpoint(run) is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere in the next epoch (or while writing a checkpoint)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    last = latest_checkpoint(run)
    assert last is not None and last.name != "checkpoint-3"
    read_checkpoint(last)  # whatever survived is a complete checkpoint
    resumed = train(parse_config(tiny_args(reach_json, run, *common, "--shared-cfg.resume",
                                           run)), progress=False)
    wa = load_file(str(full / "checkpoint-3" / "model.safetensors"))
    wb = load_file(str(resumed / "checkpoint-3" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_equals_one_process(reach_json, tmp_path):
    one = train(parse_config(tiny_args(reach_json, tmp_path / "one", "--shared-cfg.batch-size",
                                       "4", "--trainer-cfg.epochs", "1")), progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", str(ROOT / "scripts/train.py"),
           *tiny_args(reach_json, tmp_path / "two", "--shared-cfg.batch-size", "2",
                      "--trainer-cfg.epochs", "1")]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    wa = load_file(str(one / "checkpoint-0" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "checkpoint-0" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)
    steps = [r for r in run_metrics(tmp_path / "two") if "train/loss" in r]
    assert len(steps) == len([r for r in run_metrics(one) if "train/loss" in r])


@pytest.mark.slow
def test_two_nodes_of_one_process_on_localhost_equal_one_process(reach_json, tmp_path):
    """Multi-node torchrun (static rendezvous on the master's address): 2 nodes x 1 process."""
    one = train(parse_config(tiny_args(reach_json, tmp_path / "one", "--shared-cfg.batch-size",
                                       "4", "--trainer-cfg.epochs", "1")), progress=False)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    port = _free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
         "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
         str(ROOT / "scripts/train.py"),
         *tiny_args(reach_json, tmp_path / "two", "--shared-cfg.batch-size", "2",
                    "--trainer-cfg.epochs", "1")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for rank in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=300)
        assert node.returncode == 0, err[-3000:]
    wa = load_file(str(one / "checkpoint-0" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "checkpoint-0" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


def _torchrun_cmd(args: list[str], nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={_free_port()}", str(ROOT / "scripts/train.py"), *map(str, args)]


def _torchrun(args: list[str], nproc: int = 2) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(_torchrun_cmd(args, nproc), capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.slow
def test_fsdp_equals_ddp_on_two_gloo_ranks_and_resumes_exactly(reach_json, tmp_path):
    """FSDP2 (sharded per block) and DDP give the same losses and weights over a run with
    gradient accumulation; FSDP checkpoints are consolidated model.safetensors that load
    without torch.distributed, and a run resumed from one equals the uninterrupted run."""
    common = ("--shared-cfg.batch-size", "1", "--trainer-cfg.accum-iter", "2",
              "--trainer-cfg.epochs", "2", "--shared-cfg.save-every", "1")
    fsdp = ("--trainer-cfg.strategy", "fsdp")
    _torchrun(tiny_args(reach_json, tmp_path / "ddp", *common))
    _torchrun(tiny_args(reach_json, tmp_path / "fsdp", *common, *fsdp))
    _torchrun(tiny_args(reach_json, tmp_path / "resumed", *common, *fsdp, "--shared-cfg.resume",
                        tmp_path / "fsdp" / "checkpoint-0"))
    losses = [{r["step"]: r["train/loss"] for r in run_metrics(tmp_path / name)
               if "train/loss" in r} for name in ("ddp", "fsdp", "resumed")]
    assert sorted(losses[0]) == sorted(losses[1]) and len(losses[0]) > 4
    np.testing.assert_allclose([losses[1][s] for s in sorted(losses[0])],
                               [losses[0][s] for s in sorted(losses[0])], rtol=1e-4, atol=1e-5)
    assert min(losses[2]) > 1 and set(losses[2]) <= set(losses[1])
    np.testing.assert_allclose([losses[2][s] for s in sorted(losses[2])],
                               [losses[1][s] for s in sorted(losses[2])], rtol=1e-5, atol=1e-6)
    wa, wb, wc = (load_file(str(tmp_path / name / "checkpoint-1" / "model.safetensors"))
                  for name in ("ddp", "fsdp", "resumed"))
    assert set(wa) == set(wb) == set(wc)
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=k)
        torch.testing.assert_close(wc[k], wb[k], rtol=1e-5, atol=1e-6, msg=k)
    # the optimizer state (and weights) sharded by torch.distributed.checkpoint, one file per
    # rank, inside the checkpoint and covered by its manifest
    ckpt = tmp_path / "fsdp" / "checkpoint-0"
    shards = sorted(p.name for p in (ckpt / "sharded").iterdir())
    assert sum(name.endswith(".distcp") for name in shards) == 2, shards
    manifest = json.loads((ckpt / "manifest.json").read_text())["files"]
    assert all(f"sharded/{name}" in manifest for name in shards)
    assert verify_checkpoint(ckpt) is None
    assert torch.load(ckpt / "train_state.pt", weights_only=True)["optimizer"] is None
    policy, _ = load_policy(tmp_path / "fsdp")  # a plain checkpoint: no process group needed
    assert not any(hasattr(p, "full_tensor") for p in policy.parameters())


@pytest.mark.slow
def test_fsdp_bf16_mixed_equals_ddp_bf16_mixed(reach_json, tmp_path):
    """bf16-mixed under FSDP2 computes what it computes under DDP: the batch (targets
    included) and the rotary table reach the model in fp32, autocast does the casting."""
    common = ("--shared-cfg.batch-size", "1", "--trainer-cfg.epochs", "1",
              "--trainer-cfg.precision", "bf16-mixed")
    _torchrun(tiny_args(reach_json, tmp_path / "ddp", *common))
    _torchrun(tiny_args(reach_json, tmp_path / "fsdp", *common, "--trainer-cfg.strategy",
                        "fsdp"))
    losses = [{r["step"]: r["train/loss"] for r in run_metrics(tmp_path / name)
               if "train/loss" in r} for name in ("ddp", "fsdp")]
    steps = sorted(losses[0])
    assert steps == sorted(losses[1]) and len(steps) > 2
    # the first steps agree exactly (with the batch cast to bf16 on entry they differ by
    # ~4e-4); later ones drift apart as bf16 gradient rounding accumulates differently
    np.testing.assert_allclose([losses[1][s] for s in steps[:2]],
                               [losses[0][s] for s in steps[:2]], rtol=1e-6)
    np.testing.assert_allclose([losses[1][s] for s in steps], [losses[0][s] for s in steps],
                               rtol=2e-2)


def _dead_pid() -> int:
    """The id of a process that has exited (to name the leftovers of a killed save)."""
    proc = subprocess.Popen([sys.executable, "-c", ""])
    proc.wait()
    return proc.pid


def _kill_torchrun(proc: subprocess.Popen) -> None:
    """SIGKILL a torchrun launcher and its workers at once, as a crash would, and wait until
    they are gone. The workers run in sessions of their own: killing the launcher's process
    group would leave them training."""
    workers = [int(pid) for task in Path(f"/proc/{proc.pid}/task").iterdir()
               for pid in (task / "children").read_text().split()]
    for pid in (*workers, proc.pid):
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers) and time.time() < deadline:
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds workers in /proc")
def test_killed_fsdp_run_resumes_to_the_same_weights(reach_json, tmp_path):
    """An FSDP run on 2 gloo ranks, killed (launcher and workers) after its first mid-epoch
    checkpoint, resumes to the weights of the uninterrupted run, whatever the kill left: a
    staging folder of half-written sharded state, a save killed before its manifest, and a
    complete save killed before its rename (finished before any rank picks its checkpoint).
    The diffusion head draws noise from each rank's own random stream, which resumes too."""
    common = ("--shared-cfg.batch-size", "1", "--trainer-cfg.epochs", "2",
              "--shared-cfg.save-every-steps", "2", "--trainer-cfg.strategy", "fsdp",
              "--model-cfg.policy-cfg.decoder-pred-head", "diffusion")
    _torchrun(tiny_args(reach_json, tmp_path / "full", *common))
    run = tmp_path / "killed"
    proc = subprocess.Popen(_torchrun_cmd(tiny_args(reach_json, run, *common)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 180
    while latest_checkpoint(run) is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # a few steps on (or in the middle of a sharded save)
    _kill_torchrun(proc)
    last = latest_checkpoint(run)
    assert last is not None and last.name != "checkpoint-1", last
    # the checkpoint to resume from: the newest complete one, or a complete save this kill
    # interrupted before its rename
    complete = [last, *(p for p in run.glob(".checkpoint-*.tmp-*")
                         if (p / "manifest.json").is_file() and verify_checkpoint(p) is None)]
    step = max(json.loads((p / "manifest.json").read_text())["step"] for p in complete)
    # what a kill at other moments leaves, beside what this one left
    dead = _dead_pid()
    torn = run / f".checkpoint-step-1000.tmp-{dead}"  # killed before its manifest
    shutil.copytree(last, torn)
    (torn / "manifest.json").unlink()
    staging = run / f".checkpoint-step-1001.dcp-{dead}"  # killed inside dcp.save
    shutil.copytree(last / "sharded", staging)
    (staging / ".metadata").unlink()
    shard = next(staging.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    last.rename(run / f".{last.name}.tmp-{dead}")  # complete, killed before its rename
    logged = len(run_metrics(run))

    _torchrun(tiny_args(reach_json, run, *common, "--shared-cfg.resume", run))
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]
    full = {r["step"]: r["train/loss"] for r in run_metrics(tmp_path / "full")
            if "train/loss" in r}
    resumed = {r["step"]: r["train/loss"] for r in run_metrics(run)[logged:] if "train/loss" in r}
    assert min(resumed) == step + 1 and max(resumed) == max(full)  # from the completed save
    assert all(resumed[s] == full[s] for s in resumed)
    wa = load_file(str(tmp_path / "full" / "checkpoint-1" / "model.safetensors"))
    wb = load_file(str(run / "checkpoint-1" / "model.safetensors"))
    assert set(wa) == set(wb) and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_fsdp_lora_on_a_hugging_face_llama_saves_only_what_trains(reach_json, tmp_path):
    """FSDP with LoRA on a pretrained (HF-layout) Llama: neither the consolidated weights nor
    the sharded state hold the frozen base, and resuming from a checkpoint is exact."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=16, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )).save_pretrained(tmp_path / "hf")
    lora = ("--trainer-cfg.epochs", "2", "--shared-cfg.save-every", "1",
            "--trainer-cfg.strategy", "fsdp", "--model-cfg.policy-cfg.scratch-llama-config",
            "None", "--model-cfg.policy-cfg.llama-ckpt-dir", tmp_path / "hf",
            "--model-cfg.policy-cfg.phase", "finetune", "--model-cfg.policy-cfg.lora-rank", "2")
    _torchrun(tiny_args(reach_json, tmp_path / "run", *lora))
    _torchrun(tiny_args(reach_json, tmp_path / "resumed", *lora, "--shared-cfg.resume",
                        tmp_path / "run" / "checkpoint-0"))
    ckpt = tmp_path / "run" / "checkpoint-1"
    weights = load_file(str(ckpt / "model.safetensors"))
    assert not any(k.startswith("backbone.") and "lora_" not in k and "norm" not in k
                   and not k.endswith(".bias")
                   for k in weights)
    from torch.distributed.checkpoint import FileSystemReader

    saved = list(FileSystemReader(str(ckpt / "sharded")).read_metadata().state_dict_metadata)
    model_keys = [k.removeprefix("model.") for k in saved if k.startswith("model.")]
    assert any("lora_A" in k for k in model_keys)
    assert not any(k.startswith("backbone.") and "lora_" not in k and "norm" not in k
                   and not k.endswith(".bias")
                   for k in model_keys), model_keys
    other = load_file(str(tmp_path / "resumed" / "checkpoint-1" / "model.safetensors"))
    for k in weights:
        torch.testing.assert_close(other[k], weights[k], rtol=1e-5, atol=1e-6, msg=k)


def test_gradient_accumulation_matches_large_batch(reach_json, tmp_path):
    big = train(parse_config(tiny_args(reach_json, tmp_path / "big", "--shared-cfg.batch-size",
                                       "4", "--trainer-cfg.epochs", "1")), progress=False)
    acc = train(parse_config(tiny_args(reach_json, tmp_path / "acc", "--shared-cfg.batch-size",
                                       "2", "--trainer-cfg.accum-iter", "2",
                                       "--trainer-cfg.epochs", "1")), progress=False)
    steps_big = [r for r in run_metrics(big) if "train/loss" in r]
    steps_acc = [r for r in run_metrics(acc) if "train/loss" in r]
    assert len(steps_big) == len(steps_acc)
    wa = load_file(str(big / "checkpoint-0" / "model.safetensors"))
    wb = load_file(str(acc / "checkpoint-0" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5, msg=k)


def test_non_finite_loss_stops_and_keeps_last_checkpoint(reach_json, tmp_path):
    run = tmp_path / "nan"
    train(parse_config(tiny_args(reach_json, run, "--trainer-cfg.epochs", "1")), progress=False)
    before = load_file(str(run / "checkpoint-0" / "model.safetensors"))
    cfg = parse_config(tiny_args(reach_json, run, "--trainer-cfg.epochs", "3",
                                 "--shared-cfg.resume", run / "checkpoint-0",
                                 "--optimizer-cfg.lr", "1e30", "--optimizer-cfg.clip-grad",
                                 "None"))
    with pytest.raises(TrainingDiverged, match=r"non-finite.*checkpoint-0"):
        train(cfg, progress=False)
    after = load_file(str(run / "checkpoint-0" / "model.safetensors"))
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert latest_checkpoint(run).name == "checkpoint-0"


@pytest.mark.parametrize("head", ["mlp", "gmm", "diffusion", "flow"])
def test_every_head_trains_through_the_loop(reach_json, tmp_path, head):
    cfg = parse_config(tiny_args(reach_json, tmp_path / head, "--trainer-cfg.epochs", "1",
                                 "--model-cfg.policy-cfg.decoder-pred-head", head))
    policy, _ = load_policy(train(cfg, progress=False))
    assert policy.cfg.decoder_pred_head == head


def test_pretrained_path_and_finetune_phase(reach_json, tmp_path):
    pre = train(parse_config(tiny_args(reach_json, tmp_path / "pre", "--trainer-cfg.epochs", "1")),
                progress=False)
    cfg = parse_config(tiny_args(reach_json, tmp_path / "ft", "--trainer-cfg.epochs", "1",
                                 "--model-cfg.policy-cfg.phase", "finetune",
                                 "--model-cfg.policy-cfg.pretrained-path",
                                 pre / "checkpoint-0.pth"))  # ICRT-style name resolves
    policy, _ = load_policy(train(cfg, progress=False))
    trainable = [n for n, p in policy.backbone.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "norm" in n or n.endswith(".bias")
                              for n in trainable)


def test_clear_errors(reach_json, tmp_path):
    with pytest.raises(UserError, match="missing.json"):
        train(parse_config(tiny_args(reach_json, tmp_path / "a",
                                     "--model-cfg.policy-cfg.scratch-llama-config",
                                     tmp_path / "missing.json")), progress=False)
    with pytest.raises(UserError, match="Unknown action head 'transformer'; known heads"):
        train(parse_config(tiny_args(reach_json, tmp_path / "b",
                                     "--model-cfg.policy-cfg.decoder-pred-head", "transformer")),
              progress=False)
    # a checkpoint whose action dimension differs from the dataset's
    run = train(parse_config(tiny_args(reach_json, tmp_path / "c", "--trainer-cfg.epochs", "1")),
                progress=False)
    other = make_reach_dataset(tmp_path / "other", episodes_per_task=4)
    data = json.loads(other.read_text())
    data["action_keys"] = ["action", "state"]  # 2 + 3 = 5-D actions
    other.write_text(json.dumps(data))
    with pytest.raises(UserError, match=r"action dim 2 but dataset .* has 5"):
        train(parse_config(tiny_args(other, tmp_path / "d", "--model-cfg.policy-cfg."
                                     "pretrained-path", run)), progress=False)
    with pytest.raises(UserError, match="not a checkpoint directory"):
        train(parse_config(tiny_args(reach_json, tmp_path / "e", "--shared-cfg.resume",
                                     tmp_path / "nowhere")), progress=False)
    with pytest.raises(UserError, match="already holds checkpoints; continue it with"):
        train(parse_config(tiny_args(reach_json, tmp_path / "c", "--trainer-cfg.epochs", "1")),
              progress=False)
    with pytest.raises(UserError, match="16-mixed needs CUDA"):
        train(parse_config(tiny_args(reach_json, tmp_path / "f", "--trainer-cfg.precision",
                                     "16-mixed")), progress=False)


def fake_meta_llama(folder: Path) -> dict[str, torch.Tensor]:
    """A Meta-format Llama checkpoint directory of the tiny shape (with vocab weights)."""
    from icrt.models.backbones.llama import LlamaBackbone, LlamaConfig

    folder.mkdir(parents=True)
    params = json.loads(Path(TINY).read_text())
    (folder / "params.json").write_text(json.dumps({**params, "vocab_size": 32}))
    torch.manual_seed(7)
    state = LlamaBackbone(LlamaConfig.from_json(TINY, max_seq_len=64)).state_dict()
    dim = params["dim"]
    torch.save({**state, "tok_embeddings.weight": torch.randn(32, dim),
                "output.weight": torch.randn(32, dim)}, folder / "consolidated.00.pth")
    return state


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 3, 4])
def test_icrt_command_lines_train_one_short_epoch(reach_json, tmp_path, index):
    """ICRT's documented commands, with a tiny model config (or a tiny Meta-format Llama for
    the Llama-2 command) and a demo dataset."""
    (tmp_path / "encoder.pth").write_bytes(b"")
    llama = fake_meta_llama(tmp_path / "llama")
    pre = train(parse_config(tiny_args(reach_json, tmp_path / "pre", "--trainer-cfg.epochs", "1",
                                       "--shared-cfg.seq-length", "64")), progress=False)
    args = icrt_args(ICRT_COMMANDS[index], {
        "/path/to/dataset_config.json": str(reach_json),
        "config/dataset_config.json": str(reach_json),
        "/path/to/vision/encoder.pth": str(tmp_path / "encoder.pth"),
        "/path/to/output_dir/pretrain_droid/checkpoint-3.pth": str(pre / "checkpoint-0.pth"),
        "/path/to/output_dir": str(tmp_path / "out"),
        "config/model_config/custom_transformer.json": TINY,
        "/path/to/llama-2/llama-2-7b": str(tmp_path / "llama"),
    })
    # one short epoch on the 2-core CI machine: shorter sequences, one epoch
    args += ["--trainer-cfg.epochs", "1", "--shared-cfg.seq-length", "64",
             "--shared-cfg.num-pred-steps", "4", "--trainer-cfg.num-workers", "0"]
    cfg = parse_config(args)
    assert isinstance(cfg, ExperimentConfig)
    run = train(cfg, progress=False)
    assert (run / "checkpoint-0" / "model.safetensors").is_file()
    assert run.name == cfg.logging_cfg.log_name
    if index == 4:  # the pretrained Llama was loaded and fine-tuned through LoRA adapters
        policy, _ = load_policy(run)
        backbone = policy.backbone.state_dict()
        assert torch.equal(backbone["layers.0.feed_forward.w1.base_layer.weight"],
                           llama["layers.0.feed_forward.w1.weight"])
        assert any("lora_A" in k for k in backbone)


@pytest.mark.slow
def test_icrt_llama2_command_runs_unchanged_on_a_hugging_face_dir(reach_json, tmp_path):
    """ICRT's Llama-2 LoRA command with its llama-ckpt-dir a Hugging Face layout directory."""
    transformers = pytest.importorskip("transformers")
    from icrt.models.backbones.llama import LlamaConfig

    shape = LlamaConfig.from_json(TINY, max_seq_len=64)
    torch.manual_seed(3)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=shape.dim, intermediate_size=shape.ffn_hidden_dim,
        num_hidden_layers=shape.n_layers, num_attention_heads=shape.n_heads,
        max_position_embeddings=256))
    hf.save_pretrained(tmp_path / "llama-hf")
    (tmp_path / "encoder.pth").write_bytes(b"")
    args = icrt_args(ICRT_COMMANDS[4], {
        "config/dataset_config.json": str(reach_json),
        "/path/to/vision/encoder.pth": str(tmp_path / "encoder.pth"),
        "/path/to/output_dir": str(tmp_path / "out"),
        "/path/to/llama-2/llama-2-7b": str(tmp_path / "llama-hf"),
    })
    args += ["--trainer-cfg.epochs", "1", "--shared-cfg.seq-length", "64",
             "--shared-cfg.num-pred-steps", "4", "--trainer-cfg.num-workers", "0"]
    policy, _ = load_policy(train(parse_config(args), progress=False))
    backbone = policy.backbone.state_dict()
    assert torch.equal(backbone["layers.0.feed_forward.w1.base_layer.weight"],
                       hf.model.layers[0].mlp.gate_proj.weight.detach())
    assert any("lora_A" in k for k in backbone)


def test_bf16_mixed_precision_trains_on_cpu(reach_json, tmp_path):
    run = train(parse_config(tiny_args(reach_json, tmp_path / "bf16", "--trainer-cfg.epochs", "1",
                                       "--trainer-cfg.precision", "bf16-mixed")), progress=False)
    losses = [r["train/loss"] for r in run_metrics(run) if "train/loss" in r]
    assert losses and all(np.isfinite(losses))
    policy, _ = load_policy(run)
    assert next(policy.parameters()).dtype == torch.float32  # weights stay fp32 (autocast)


@pytest.mark.slow
def test_compiled_backbone_trains_and_saves_plain_checkpoints(reach_json, tmp_path):
    run = train(parse_config(tiny_args(reach_json, tmp_path / "compiled", "--trainer-cfg.epochs",
                                       "1", "--trainer-cfg.compile")), progress=False)
    losses = [r["train/loss"] for r in run_metrics(run) if "train/loss" in r]
    assert losses and all(np.isfinite(losses))
    state = load_file(str(run / "checkpoint-0" / "model.safetensors"))
    assert not any("_orig_mod" in k for k in state)
    load_policy(run)


def test_warmup_longer_than_the_run_is_warned(reach_json, tmp_path, caplog):
    args = tiny_args(reach_json, tmp_path / "run", "--trainer-cfg.epochs", "1",
                     "--optimizer-cfg.warmup-epochs", "40")
    with caplog.at_level("WARNING", logger="icrt"):
        train(parse_config(args), progress=False)
    assert any("warmup-epochs 40 is not below --trainer-cfg.epochs 1" in r.getMessage()
               for r in caplog.records)
