"""Improve an imitation-learned checkpoint with PPO on its own prompted rollouts (FLaRe).

    python scripts/finetune_rl.py --il-ckpt-path runs/mw5 --tasks reach-v3 \
        --prompt-dataset data/mw5_prompts.json --num-train-processes 2 \
        --output-dir runs/mw5_ppo_reach --max-steps 200 --max-updates 40
    python scripts/eval.py --checkpoint runs/mw5_ppo_reach --tasks reach-v3 \
        --prompt-dataset data/mw5_prompts.json --max-steps 200     # unchanged evaluation

Running the same command on the same --output-dir resumes after its last checkpoint.
Run with -h for every option; docs/rl.md explains the method and its defaults.
"""

import logging

import tyro

from icrt.cli import run
from icrt.rl.ppo import PPOConfig, finetune


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = tyro.cli(PPOConfig, description=__doc__)
    out = finetune(cfg)
    hist = out["history"]
    if hist:
        h = hist[-1]
        print(f"{h['update']} updates, {h['env_steps']} environment steps; last rollout "
              f"success {100 * h['success_rate']:.1f}%; run in {out['run_dir']} "
              f"(success_curve.png, tensorboard/)")


if __name__ == "__main__":
    run(main)
