"""The goal-mask generator: data, DiT, flow-matching and diffusion paths, samplers, training
with checkpoints that resume exactly, and the sampling script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import _free_port

from icrt.errors import UserError
from icrt.generative import train as gtrain
from icrt.generative.data import GoalMaskDataset, load_scene, network_input
from icrt.generative.dit import DiT, DiTConfig
from icrt.generative.paths import PathConfig, SamplerConfig, build_path
from icrt.generative.train import (
    DataConfig,
    GenerativeConfig,
    GenerativeTrainerConfig,
    GoalModel,
    GoalModelConfig,
    load_goal_model,
    train_generative,
)

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("robot_image", "goal_image", "movable_objects_image", "static_objects_image",
        "target_object", "target_goal")
SMALL = DiTConfig(hidden_size=32, depth=2, num_heads=2, patch_size=4)


def _write_scenes(folder: Path, n: int, size: int = 32, legacy: bool = False) -> list[Path]:
    """Scenes whose goal is the target object shifted right by a quarter of the image: a rule
    the network can learn from the context."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        m = {k: np.zeros((size, size), np.uint8) for k in KEYS}
        r, c = rng.integers(2, size // 2, 2)
        m["target_object"][r:r + 4, c:c + 4] = 1
        m["target_goal"][r:r + 4, c + size // 4:c + size // 4 + 4] = 1
        m["movable_objects_image"] = m["target_object"].copy()
        m["static_objects_image"][0, :] = 1
        m["robot_image"][size - 3, 2] = 1
        m["goal_image"][size - 3, size - 3] = 1
        if legacy:
            for new, old in (("robot_image", "robot"), ("goal_image", "goal"),
                             ("movable_objects_image", "movable"),
                             ("static_objects_image", "static")):
                m[old] = m.pop(new)
        files.append(folder / f"scene_{i:03d}.npz")
        np.savez_compressed(files[-1], **m)
    return files


def _cfg(tmp_path: Path, data: Path, **kw) -> GenerativeConfig:
    base = dict(batch_size=4, max_epochs=3, image_size=16, base_lr=1e-3,
                data=DataConfig(data_dir=str(data), val_fraction=0.25),
                model=GoalModelConfig(network=SMALL),
                trainer=GenerativeTrainerConfig(images_every=1, num_val_images=2,
                                                warmup_epochs=0.0),
                output_dir=str(tmp_path / "out"), sampling_steps=4)
    return GenerativeConfig(**{**base, **kw})


def test_legacy_keys_load_like_new_ones(tmp_path):
    new = _write_scenes(tmp_path / "new", 2)
    old = _write_scenes(tmp_path / "old", 2, legacy=True)
    for a, b in zip(new, old, strict=True):
        ca, ga, _ = load_scene(a, 16)
        cb, gb, _ = load_scene(b, 16)
        assert torch.equal(ca, cb) and torch.equal(ga, gb) and ca.shape == (5, 16, 16)


def test_bad_files_are_one_sentence_naming_the_file(tmp_path):
    good = _write_scenes(tmp_path, 1)[0]
    broken = tmp_path / "broken.npz"
    broken.write_bytes(good.read_bytes()[:100])
    with pytest.raises(UserError, match="broken.npz' cannot be read"):
        GoalMaskDataset([broken], 16)
    partial = tmp_path / "partial.npz"
    np.savez(partial, robot_image=np.zeros((8, 8)))
    with pytest.raises(UserError, match="partial.npz' lacks 'goal_image'"):
        GoalMaskDataset([partial], 16)
    with pytest.raises(UserError, match="does not exist"):
        train_generative(_cfg(tmp_path, tmp_path / "nowhere"), progress=False)


def test_dit_starts_as_zero_and_keeps_shapes():
    net = DiT(SMALL, 16)
    x = torch.randn(3, 8, 16, 16)
    out = net(x, torch.rand(3))
    assert out.shape == (3, 1, 16, 16) and torch.count_nonzero(out) == 0  # adaLN-Zero
    with pytest.raises(ValueError, match="multiple of the patch size"):
        DiT(SMALL, 18)


@pytest.mark.parametrize("objective,path", [
    ("flow_matching", PathConfig(scheduler="condot")),
    ("flow_matching", PathConfig(scheduler="cosine")),
    ("diffusion", PathConfig(prediction_type="epsilon")),
    ("diffusion", PathConfig(prediction_type="v_prediction")),
])
def test_each_path_loss_decreases_on_a_tiny_set(tmp_path, objective, path):
    data = GoalMaskDataset(_write_scenes(tmp_path, 8), 16)
    torch.manual_seed(0)
    model = GoalModel(GoalModelConfig(objective=objective, path=path, network=SMALL), 16)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)

    def fixed_loss():  # the same noise and times before and after training
        with torch.no_grad():
            g = torch.Generator().manual_seed(123)
            return np.mean([float(model(data.context, data.goal, g)["loss"]) for _ in range(8)])

    before = fixed_loss()
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        loss = model(data.context, data.goal, g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss()
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("objective,sampler", [
    ("flow_matching", SamplerConfig(method="euler")),
    ("flow_matching", SamplerConfig(method="midpoint")),
    ("diffusion", SamplerConfig(sampler_type="ddim", eta=0.0)),
    ("diffusion", SamplerConfig(sampler_type="ddim", eta=1.0)),
    ("diffusion", SamplerConfig(sampler_type="ddpm")),
])
def test_samplers_shape_range_and_seed(tmp_path, objective, sampler):
    data = GoalMaskDataset(_write_scenes(tmp_path, 3), 16)
    torch.manual_seed(0)
    model = GoalModel(GoalModelConfig(objective=objective, network=SMALL), 16)
    for p in model.net.final_linear.parameters():  # a non-zero network
        torch.nn.init.normal_(p, std=0.1)
    draws = [model.sample(data.context, 5, sampler, torch.Generator().manual_seed(s))
             for s in (1, 1, 2)]
    assert draws[0].shape == (3, 1, 16, 16)
    assert float(draws[0].min()) >= 0.0 and float(draws[0].max()) <= 1.0
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])


def test_dopri5_and_rk4_agree_on_a_smooth_field():
    path = build_path("flow_matching", PathConfig())
    target = torch.linspace(-1, 1, 64).view(1, 1, 8, 8)

    def velocity(x, t):  # pulls x towards target, smoothly in x and t
        return (target - x) * (1 + t.view(-1, 1, 1, 1))

    out = {m: path.sample(velocity, (2, 1, 8, 8), 50, SamplerConfig(method=m, atol=1e-7,
                                                                     rtol=1e-7),
                          torch.Generator().manual_seed(0))
           for m in ("rk4", "dopri5")}
    torch.testing.assert_close(out["rk4"], out["dopri5"], atol=1e-4, rtol=1e-4)
    euler = path.sample(velocity, (2, 1, 8, 8), 5, SamplerConfig(method="euler"),
                        torch.Generator().manual_seed(0))
    assert (euler - out["dopri5"]).abs().max() > 1e-3  # 5 Euler steps are visibly off


def test_largest_component_keeps_the_biggest_blob():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sample_goals", ROOT / "scripts/sample_goals.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mask = np.zeros((10, 10), np.float32)
    mask[1:4, 1:4] = 0.9  # 9 pixels
    mask[7, 7] = 1.0  # a speckle
    out = module.largest_component(mask)
    assert out.sum() == 9 and out[7, 7] == 0 and out[2, 2] == 1
    assert module.largest_component(np.zeros((4, 4))).sum() == 0


def test_network_input_channels():
    ctx = torch.rand(2, 5, 16, 16)
    x = network_input(ctx, torch.randn(2, 1, 16, 16))
    assert x.shape == (2, 8, 16, 16)
    assert torch.allclose(x[:, 5, 0], torch.linspace(-1, 1, 16).expand(2, -1))  # x coordinate


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.txt").read_text().splitlines()]


def test_resume_reproduces_the_uninterrupted_losses(tmp_path, monkeypatch):
    data = tmp_path / "data"
    _write_scenes(data, 12)
    full = train_generative(_cfg(tmp_path, data, run_name="full"), progress=False)
    calls = {"n": 0}
    real = gtrain.validate

    def stop_at_third(*a, **k):  # the run dies in epoch 2, after epoch 1's checkpoint
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(gtrain, "validate", stop_at_third)
    with pytest.raises(KeyboardInterrupt):
        train_generative(_cfg(tmp_path, data, run_name="cut"), progress=False)
    monkeypatch.setattr(gtrain, "validate", real)
    cut = tmp_path / "out" / "cut"
    with pytest.raises(UserError, match="already holds a run"):
        train_generative(_cfg(tmp_path, data, run_name="cut"), progress=False)
    train_generative(_cfg(tmp_path, data, run_name="cut",
                          ckpt_path=str(cut / "checkpoints" / "last")), progress=False)
    a, b = _log(full), _log(cut)
    assert [r["epoch"] for r in b] == [0, 1, 2]
    for ra, rb in zip(a, b, strict=True):
        assert ra["train_loss"] == pytest.approx(rb["train_loss"], rel=1e-6)
        assert ra["val_loss"] == pytest.approx(rb["val_loss"], rel=1e-6)


def test_best_checkpoints_are_the_lowest_validation_losses(tmp_path):
    data = tmp_path / "data"
    _write_scenes(data, 12)
    run = train_generative(_cfg(tmp_path, data, max_epochs=5,
                                trainer=GenerativeTrainerConfig(save_top_k=2, images_every=2,
                                                                warmup_epochs=0.0)),
                           progress=False)
    records = _log(run)
    lowest = sorted(records, key=lambda r: r["val_loss"])[:2]
    kept = sorted(p.name for p in (run / "checkpoints").glob("epoch*"))
    assert kept == sorted(f"epoch{r['epoch']:03d}-val_loss{r['val_loss']:.4f}" for r in lowest)
    assert records[-1]["val_loss_best"] == pytest.approx(lowest[0]["val_loss"])
    assert (run / "config.json").is_file() and (run / "checkpoints" / "last").is_dir()
    assert any((run / "tensorboard").iterdir())
    for r in lowest:  # the exact loss beside the rounded name
        saved = json.loads((run / "checkpoints" / f"epoch{r['epoch']:03d}-val_loss"
                            f"{r['val_loss']:.4f}" / "metrics.json").read_text())
        assert saved["val_loss"] == r["val_loss"] and saved["epoch"] == r["epoch"]
    model, cfg = load_goal_model(run)
    assert cfg.image_size == 16 and not model.training


def test_best_checkpoint_is_chosen_by_the_exact_loss_when_names_tie(tmp_path):
    from icrt.generative.train import _val_loss

    ckpts = tmp_path / "checkpoints"
    for epoch, val in ((37, 0.0023929), (38, 0.0023706), (39, 0.0023657)):
        d = ckpts / f"epoch{epoch:03d}-val_loss{val:.4f}"  # all three named ...0.0024
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps({"epoch": epoch, "val_loss": val}))
    assert min(sorted(ckpts.iterdir()), key=_val_loss).name == "epoch039-val_loss0.0024"
    (ckpts / "epoch039-val_loss0.0024" / "metrics.json").unlink()  # older runs: the name, then
    (ckpts / "epoch038-val_loss0.0024" / "metrics.json").unlink()  # the later epoch
    assert min(sorted(ckpts.iterdir()), key=_val_loss).name == "epoch037-val_loss0.0024"
    (ckpts / "epoch037-val_loss0.0024" / "metrics.json").unlink()
    assert min(sorted(ckpts.iterdir()), key=_val_loss).name == "epoch039-val_loss0.0024"


def test_sample_script_scores_generated_scenes(tmp_path):
    from icrt.generative.namo import generate_scene, write_scene_npz

    data = tmp_path / "namo"
    data.mkdir()
    for i in range(6):
        write_scene_npz(data / f"scene_{i:06d}.npz", generate_scene(i), size=64)
    run = train_generative(_cfg(tmp_path, data, max_epochs=1), progress=False)
    out = tmp_path / "samples"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/sample_goals.py"), "--checkpoint", str(run),
         "--data-dir", str(data), "--out", str(out), "--samples-per-scene", "2",
         "--scenes-per-panel", "4", "--method", "euler"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 12 and 0.0 <= metrics["checker_accepts"] <= 1.0
    assert 0.0 <= metrics["checker_accepts_largest_component"] <= 1.0
    verdicts = metrics["checker_verdicts"]
    assert set(verdicts) == {"valid", "unreadable", "overlaps", "blocks_path"}
    assert verdicts["valid"] == metrics["checker_accepts"]
    assert sum(verdicts.values()) == pytest.approx(1.0)
    assert metrics["sampler"]["method"] == "euler" and metrics["ms_per_sample"] > 0
    assert sorted(p.name for p in out.glob("*.png")) == ["panel_000.png", "panel_001.png"]


@pytest.mark.slow
def test_two_processes_under_torchrun(tmp_path):
    data = tmp_path / "data"
    _write_scenes(data, 10)  # 9 training scenes: 5 and 4 per rank would mean 3 and 2 steps
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
           f"--master_port={_free_port()}", str(ROOT / "scripts/train_generative.py"),
           "--data.data-dir", str(data), "--image-size", "16", "--batch-size", "2",
           "--max-epochs", "2", "--model.network.hidden-size", "32",
           "--model.network.depth", "2", "--model.network.num-heads", "2",
           "--output-dir", str(tmp_path / "out"), "--sampling-steps", "2"]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    records = _log(tmp_path / "out" / "goal_dit")
    assert [r["epoch"] for r in records] == [0, 1]
    # every rank takes as many steps (unequal counts would hang DDP): 4 scenes each, batch 2
    assert records[0]["step"] == 2


def test_sample_goals_help_gives_each_option_its_own_text():
    result = subprocess.run([sys.executable, "scripts/sample_goals.py", "-h"],
                            capture_output=True, text=True,
                            env={**os.environ, "COLUMNS": "400"})
    text = " ".join(result.stdout.replace("│", " ").split())
    for phrase in ("Seed of the sampling noise", "Flow matching ODE method", "Diffusion sampler",
                   "DDIM eta", "Device: auto"):
        assert text.count(phrase) == 1, phrase
