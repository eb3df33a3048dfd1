"""Sample goal masks for scenes with a trained goal model; save PNG panels and, for generated
scenes (files holding their `scene` description), score every sample with the checker.

    python scripts/sample_goals.py --checkpoint outputs/goal_dit --data-dir data/namo_test \
        --out samples/ --num-scenes 100 [--steps 20] [--method midpoint] [--sampler-type ddim]

Each panel row is one scene: the context (static obstacles grey, movable objects red, the
selected object green, robot and its goal blue), then the samples, then the ground truth.
Prints, and writes to OUT/metrics.json: the share of samples the checker accepts (a placement
of the selected object that clears the robot's path) and why the others were rejected
(unreadable, overlapping something, blocking the path), the IoU with the ground-truth goal, and
milliseconds per sample.
"""

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import tyro

from icrt.cli import run


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """Sample goal masks and score them."""

    # Run directory (its best checkpoint by validation loss) or checkpoint directory.
    checkpoint: str
    # Folder of .npz scene files.
    data_dir: str
    # Where the PNG panels and metrics.json go.
    out: str
    # Scenes used (the first N files in name order; 0: all).
    num_scenes: int = 0
    # Samples drawn per scene.
    samples_per_scene: int = 1
    # Sampling steps (default: the checkpoint's).
    steps: int | None = None
    # Flow matching ODE method (default: the checkpoint's).
    method: Literal["euler", "midpoint", "rk4", "dopri5"] | None = None
    # Diffusion sampler (default: the checkpoint's).
    sampler_type: Literal["ddim", "ddpm"] | None = None
    # DDIM eta: 0 deterministic, 1 as stochastic as DDPM (default: the checkpoint's).
    eta: float | None = None
    # Also score each sample cleaned to its largest 4-connected blob above 0.5 (isolated
    # speckles of an under-trained model removed); reported beside the raw scores.
    largest_component: bool = True
    # Scenes per PNG panel.
    scenes_per_panel: int = 8
    # Batch of scenes sampled together.
    batch_size: int = 16
    # Seed of the sampling noise.
    seed: int = 0
    # Device: auto (CUDA when available), cpu, cuda or cuda:N.
    device: str = "auto"


def panel(context: torch.Tensor, samples: torch.Tensor, goal: torch.Tensor) -> np.ndarray:
    """(H_total, W_total, 3) uint8: one row per scene."""
    rows = []
    for c, s, g in zip(context, samples, goal, strict=True):
        scene = torch.stack([0.5 * c[3] + c[2], 0.5 * c[3] + c[4], 0.5 * c[3] + c[0] + c[1]])
        tiles = [scene.clamp(0, 1)] + [x.expand(3, -1, -1) for x in s] + [g.expand(3, -1, -1)]
        rows.append(torch.cat(tiles, dim=2))
    img = torch.cat(rows, dim=1).permute(1, 2, 0).numpy()
    return (img * 255).round().astype(np.uint8)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected blob of ``mask > 0.5`` as a 0/1 float mask (empty stays empty)."""
    from scipy import ndimage

    labels, n = ndimage.label(mask > 0.5)
    if n == 0:
        return np.zeros_like(mask, dtype=np.float32)
    sizes = ndimage.sum_labels(np.ones_like(labels), labels, index=np.arange(1, n + 1))
    return (labels == 1 + int(np.argmax(sizes))).astype(np.float32)


def main(cfg: SampleConfig) -> None:
    import imageio.v2 as imageio

    from icrt.errors import UserError
    from icrt.generative.data import GoalMaskDataset, scene_files
    from icrt.generative.namo import VERDICTS, Scene, check_goal, goal_iou, goal_verdict
    from icrt.generative.train import load_goal_model
    from icrt.train.dist import resolve_device

    device = resolve_device(cfg.device)
    model, mcfg = load_goal_model(cfg.checkpoint, device)
    sampler = mcfg.model.sampler
    changes = {k: v for k, v in (("method", cfg.method), ("sampler_type", cfg.sampler_type),
                                 ("eta", cfg.eta)) if v is not None}
    sampler = dataclasses.replace(sampler, **changes)
    steps = cfg.steps or mcfg.steps
    files = scene_files(cfg.data_dir)
    files = files[: cfg.num_scenes] if cfg.num_scenes else files
    data = GoalMaskDataset(files, mcfg.image_size)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(cfg.seed)
    samples, seconds = [], 0.0
    for i in range(0, len(data), cfg.batch_size):
        ctx = data.context[i:i + cfg.batch_size].to(device)
        reps = ctx.repeat_interleave(cfg.samples_per_scene, 0)
        t0 = time.perf_counter()
        x = model.sample(reps, steps, sampler, generator=g).cpu()
        seconds += time.perf_counter() - t0
        samples.append(x.view(len(ctx), cfg.samples_per_scene, *x.shape[1:]))
    samples = torch.cat(samples)  # (N, K, 1, S, S)
    for p in range(0, len(data), cfg.scenes_per_panel):
        sl = slice(p, p + cfg.scenes_per_panel)
        imageio.imwrite(out / f"panel_{p // cfg.scenes_per_panel:03d}.png",
                        panel(data.context[sl], samples[sl], data.goal[sl]))
    n = len(data) * cfg.samples_per_scene
    metrics = {"checkpoint": cfg.checkpoint, "objective": mcfg.model.objective,
               "sampler": dataclasses.asdict(sampler), "steps": steps, "scenes": len(data),
               "samples": n, "ms_per_sample": 1000 * seconds / n,
               "iou": float(np.mean([goal_iou(s[0].numpy(), data.goal[i][0].numpy())
                                     for i in range(len(data)) for s in samples[i]]))}
    cleaned = [[largest_component(s[0].numpy()) for s in samples[i]] for i in range(len(data))
               ] if cfg.largest_component else []
    if cfg.largest_component:
        metrics["iou_largest_component"] = float(np.mean([
            goal_iou(c, data.goal[i][0].numpy()) for i in range(len(data)) for c in cleaned[i]]))
    if all(s is not None for s in data.scenes):
        verdicts = [goal_verdict(Scene.from_json(data.scenes[i]), s[0].numpy())
                    for i in range(len(data)) for s in samples[i]]
        metrics["checker_accepts"] = verdicts.count("valid") / len(verdicts)
        # why the others were rejected (shares of all samples; see goal_verdict)
        metrics["checker_verdicts"] = {v: verdicts.count(v) / len(verdicts) for v in VERDICTS}
        if cfg.largest_component:
            metrics["checker_accepts_largest_component"] = float(np.mean([
                check_goal(Scene.from_json(data.scenes[i]), c)
                for i in range(len(data)) for c in cleaned[i]]))
    elif not any(s is not None for s in data.scenes):
        logging.info("the scene files hold no scene description: IoU only")
    else:
        raise UserError(f"Some files of '{cfg.data_dir}' hold a scene description and some "
                        f"do not; score them separately.")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
    print(json.dumps({k: v for k, v in metrics.items() if k != "sampler"}))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run(lambda: main(tyro.cli(SampleConfig, description=__doc__)))
