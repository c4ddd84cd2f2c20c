"""Tasks: summarization, classification, table-to-text. See :mod:`peftlab.tasks.base` for the contract."""

from peftlab.tasks.base import DataError, EvalOutput, Example, Predictor, Task, get_task, register, task_names

# Importing a task module registers it.
from peftlab.tasks import classification, summarization, table_to_text  # noqa: E402,F401  isort: skip

__all__ = ["DataError", "EvalOutput", "Example", "Predictor", "Task", "get_task", "register", "task_names"]
