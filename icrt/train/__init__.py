"""Training: ``train(cfg)`` runs a whole (optionally distributed) training run."""

from icrt.train.loop import train

__all__ = ["train"]
