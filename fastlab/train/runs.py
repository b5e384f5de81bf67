"""Using a trained run: its config, task and model from a checkpoint, for the ``eval`` and
``sample`` commands (and anything else that wants a run's model back)."""
import os
from dataclasses import dataclass
from typing import Any, Dict

import torch
from torch import nn

from fastlab.tasks import Task, build_task
from fastlab.tasks.base import ConfigError
from fastlab.train import checkpoint, environment
from fastlab.train.config import Config, build_config


@dataclass
class LoadedRun:
    cfg: Config
    task: Task
    model: nn.Module
    #: the checkpoint file the weights came from, and the state saved in it
    path: str
    state: Dict[str, Any]
    device: torch.device


def checkpoint_path(run_dir: str, which: str) -> str:
    """``which``: best (best.pt, else the newest good checkpoint), last (the newest good
    checkpoint) or a file path."""
    if which not in ("best", "last"):
        if not os.path.isfile(which):
            raise ConfigError(f"--checkpoint: no such file {which!r} (or best, last)")
        return which
    if which == "best" and os.path.exists(os.path.join(run_dir, "best.pt")):
        return os.path.join(run_dir, "best.pt")
    path, _, problems = checkpoint.load_latest(run_dir)
    if path is None:
        raise ConfigError(f"{run_dir}: no usable checkpoint"
                          + (f" ({'; '.join(problems)})" if problems else ""))
    return path


def open_run(run_dir: str, which: str = "best", device: str = "auto") -> LoadedRun:
    """The run's task and model (in eval mode, on ``device``) with the weights of the
    checkpoint ``which`` (see :func:`checkpoint_path`)."""
    config = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config):
        raise ConfigError(f"{run_dir}: not a run directory (no config.json)")
    # where it came from no longer matters: the weights come from the run's checkpoint
    cfg = build_config(config, ["train.init_from="])
    path = checkpoint_path(run_dir, which)
    try:
        state = checkpoint.load(path)
    except checkpoint.CheckpointError as exc:
        raise ConfigError(str(exc)) from None
    target = environment.pick_device(device, 0)
    task = build_task(cfg.task)
    task.load_state_dict(state.get("task", {}))
    model = task.build_model(cfg.model)
    model.load_state_dict(state["model"])
    model.to(target).eval()
    return LoadedRun(cfg, task, model, path, state, target)
