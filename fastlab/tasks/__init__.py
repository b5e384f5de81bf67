"""Built-in tasks, registered by name; a task of one's own loads as ``package.module:Class``."""
import dataclasses
import importlib
from typing import Dict, Type

from fastlab.tasks.addition import Addition, AdditionConfig
from fastlab.tasks.base import LossOutput, Task, TaskConfig, counter_uniform
from fastlab.tasks.copy import Copy, CopyConfig

#: the built-in tasks: name -> "module:Class", imported when a run selects them
TASKS: Dict[str, str] = {
    "addition": "fastlab.tasks.addition:Addition",
    "copy": "fastlab.tasks.copy:Copy",
    "lm": "fastlab.tasks.lm:LanguageModel",
    "mlm": "fastlab.tasks.mlm:MaskedLM",
    "hier_ae": "fastlab.tasks.hier_ae:HierarchicalAutoencoder",
    "distill": "fastlab.tasks.distill:Distill",
}


def resolve(name: str) -> Type[Task]:
    """The task class of ``task.name``: a registered name or ``package.module:Class``."""
    if ":" not in name:
        if name not in TASKS:
            raise ValueError(f"task.name: unknown task {name!r}; known: {sorted(TASKS)}, or "
                             f"package.module:Class for a task of your own")
        module_name, _, class_name = TASKS[name].partition(":")
        return getattr(importlib.import_module(module_name), class_name)
    module_name, _, class_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"task.name={name!r}: cannot import {module_name!r} ({exc})") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ValueError(f"task.name={name!r}: {module_name} has no Task subclass "
                         f"{class_name!r}")
    if not (dataclasses.is_dataclass(cls.Config) and issubclass(cls.Config, TaskConfig)):
        raise ValueError(f"task.name={name!r}: {class_name}.Config must be a dataclass "
                         f"deriving from fastlab.tasks.TaskConfig")
    return cls


def build_task(cfg: TaskConfig) -> Task:
    return resolve(cfg.name)(cfg)


__all__ = ["Task", "TaskConfig", "LossOutput", "TASKS", "resolve", "build_task",
           "counter_uniform", "Addition", "AdditionConfig", "Copy", "CopyConfig"]
