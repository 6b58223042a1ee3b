"""Task loaders: packaged offline copies, Hub datasets and local files, all as ``text``/``label`` DatasetDicts."""

from .tasks import TASKS, TaskSpec, get_task_spec, load_paraphrases, load_task, normalize_text, read_paraphrase_file

__all__ = [
    "TASKS",
    "TaskSpec",
    "get_task_spec",
    "load_paraphrases",
    "load_task",
    "normalize_text",
    "read_paraphrase_file",
]
