"""Built-in tasks: data, model and metrics for each."""
from fastlab.tasks.addition import Addition
from fastlab.tasks.base import Task

TASKS = {"addition": Addition}


def build_task(name: str, **kwargs) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[name](**kwargs)


__all__ = ["Task", "TASKS", "build_task", "Addition"]
