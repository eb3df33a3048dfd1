"""Run logging on rank 0: log.txt (JSON lines), TensorBoard always, wandb when asked."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from icrt.config import ExperimentConfig, config_to_dict

log = logging.getLogger(__name__)


class RunLogger:
    def __init__(self, cfg: ExperimentConfig, run_dir: Path, enabled: bool = True) -> None:
        self.enabled = enabled
        self._file = None
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self._file = open(run_dir / "log.txt", "a", buffering=1)
        self._tb = SummaryWriter(cfg.logging_cfg.log_dir or str(run_dir / "tensorboard"))
        if cfg.logging_cfg.log_name and cfg.logging_cfg.wandb:
            self._wandb = self._init_wandb(cfg, run_dir)

    @staticmethod
    def _init_wandb(cfg: ExperimentConfig, run_dir: Path) -> Any:
        try:
            import wandb
        except ImportError:
            log.info("wandb is not installed; logging to TensorBoard and log.txt only")
            return None
        # without credentials, log offline (sync later with `wandb sync`) instead of failing
        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY")
                                                else "offline")
        return wandb.init(project=cfg.logging_cfg.wandb_project, name=cfg.logging_cfg.log_name,
                          dir=str(run_dir), config=config_to_dict(cfg), mode=mode,
                          resume="allow", id=cfg.logging_cfg.log_name)

    def log(self, step: int, metrics: dict[str, float], **extra: Any) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **extra, **metrics}
        self._file.write(json.dumps(record) + "\n")
        for k, v in metrics.items():
            self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
