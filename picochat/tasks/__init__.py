"""Chat tasks: one module per dataset, each a sequence of conversations that can grade answers.

registry.py lists them all; build_task(name, path) makes one by name; mixture.Mixture combines
several with weights.
"""

from picochat.tasks.base import Task
from picochat.tasks.mixture import Mixture, build_mixture, build_task, parse_mixture
from picochat.tasks.registry import TASKS

__all__ = ["TASKS", "Mixture", "Task", "build_mixture", "build_task", "parse_mixture"]
