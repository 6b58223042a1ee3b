"""Task loaders (packaged offline copies, Hub datasets and local files, all as ``text``/``label`` DatasetDicts), the
``row_index`` row identity, and saving a poisoned dataset with a record of its attack."""

from .rows import ROW_INDEX, add_row_index, check_row_index
from .saving import POISON_INFO_FILE, load_poison_info, save_dataset_dict
from .tasks import (
    TASKS,
    TaskSpec,
    attack_for_task,
    get_task_spec,
    infer_label_names,
    load_paraphrases,
    load_task,
    normalize_text,
    read_paraphrase_file,
)

__all__ = [
    "POISON_INFO_FILE",
    "ROW_INDEX",
    "TASKS",
    "TaskSpec",
    "attack_for_task",
    "add_row_index",
    "check_row_index",
    "get_task_spec",
    "infer_label_names",
    "load_paraphrases",
    "load_poison_info",
    "load_task",
    "normalize_text",
    "read_paraphrase_file",
    "save_dataset_dict",
]
