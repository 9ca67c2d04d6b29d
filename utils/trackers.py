"""Mirror a run into Weights & Biases (``--wandb``) or TensorBoard (``--tensorboard``).

results.txt stays the source of truth: a tracker receives a copy of every row written there
(the ``step`` column as its step axis, NaN cells left out), the run's config.json record at
the start and summary.json's contents at the end. The packages are imported only when a flag
asks for them, so nothing else depends on them being installed.

- Weights & Biases logs offline (into ``<run>/wandb/``, ``wandb sync`` uploads it later) unless
  ``WANDB_MODE`` is set; the project is ``--wandb-project``, else ``$WANDB_PROJECT``, else
  ``eoss``; ``--wandb-group`` and ``--wandb-tags`` group and tag the run (a sweep's runs share
  the sweep's name as their group). Each training process is
  one W&B run: a resumed run starts a new one (config ``start_step``) from the checkpoint's step.
- TensorBoard event files go into ``<run>/tensorboard/``; a resumed run first discards the
  events at or after the checkpoint's step, as results.txt does.
"""

from __future__ import annotations

import importlib
import json
import math
import os

from utils.errors import UserError

_PACKAGES = {"wandb": ("wandb", "wandb"), "tensorboard": ("torch.utils.tensorboard", "tensorboard")}


def _import(flag: str):
    module, package = _PACKAGES[flag]
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"--{flag} needs the {package} package, which is not installed; pip install {package}, or drop --{flag}")


def check_installed(cfg) -> None:
    """Import the packages of the trackers ``cfg`` asks for; a missing one is a UserError."""
    for flag in _PACKAGES:
        if getattr(cfg, flag, False):
            _import(flag)


def _numbers(values: dict) -> dict:
    """The finite numbers among ``values`` (bools as 0/1)."""
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}


class WandbTracker:
    def __init__(self, wandb, run_dir: str, record: dict, start_step: int):
        settings = record["config"]
        config = {**settings, "resolved": record.get("resolved"), "start_step": start_step}
        project = settings.get("wandb_project") or os.environ.get("WANDB_PROJECT", "eoss")
        self.run = wandb.init(project=project, group=settings.get("wandb_group"), tags=settings.get("wandb_tags"),
                              name=os.path.basename(os.path.normpath(run_dir)), dir=run_dir, config=config,
                              mode=None if os.environ.get("WANDB_MODE") else "offline")

    def log_row(self, row: dict) -> None:
        self.run.log({k: v for k, v in _numbers(row).items() if k != "step"}, step=int(row["step"]))

    def close(self, summary: dict | None) -> None:
        if summary is not None:
            self.run.summary.update(summary)
        self.run.finish(exit_code=0 if summary is not None else 1)


class TensorBoardTracker:
    def __init__(self, module, run_dir: str, record: dict, start_step: int):
        self.writer = module.SummaryWriter(log_dir=os.path.join(run_dir, "tensorboard"), purge_step=start_step or None)
        self.writer.add_text("config", _as_markdown(record), global_step=start_step)

    def log_row(self, row: dict) -> None:
        step = int(row["step"])
        for key, value in _numbers(row).items():
            if key != "step":
                self.writer.add_scalar(key, value, global_step=step)

    def close(self, summary: dict | None) -> None:
        if summary is not None:
            step = int(summary.get("final_step", 0))
            self.writer.add_text("summary", _as_markdown(summary), global_step=step)
            for key, value in _numbers(summary).items():
                self.writer.add_scalar(f"summary/{key}", value, global_step=step)
        self.writer.close()


def _as_markdown(data: dict) -> str:
    return "```\n" + json.dumps(data, indent=2) + "\n```"


class Trackers:
    """The trackers a run asked for (possibly none), fed together."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    def log_row(self, row: dict) -> None:
        for tracker in self.trackers:
            tracker.log_row(row)

    def close(self, summary: dict | None) -> None:
        """Record the summary (None when training failed) and end every tracker run."""
        for tracker in self.trackers:
            tracker.close(summary)

    def mirror(self, writer):
        """``writer`` (a ResultsWriter) with every row it writes also sent to the trackers."""
        return _MirroredWriter(writer, self) if self.trackers else writer


class _MirroredWriter:
    def __init__(self, writer, trackers: Trackers):
        self.writer, self.trackers = writer, trackers

    def write_row(self, values: dict) -> None:
        self.writer.write_row(values)
        self.trackers.log_row(values)

    def close(self) -> None:
        self.writer.close()


def open_trackers(cfg, run_dir: str, record: dict, start_step: int) -> Trackers:
    """Start the trackers ``cfg`` asks for on the run in ``run_dir`` (config.json's ``record``)."""
    opened = []
    if cfg.wandb:
        opened.append(WandbTracker(_import("wandb"), run_dir, record, start_step))
    if cfg.tensorboard:
        opened.append(TensorBoardTracker(_import("tensorboard"), run_dir, record, start_step))
    return Trackers(opened)
