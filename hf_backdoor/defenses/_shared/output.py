"""Where a repair's result goes: broadcast from the main process, made JSON-serialisable, logged and written.

Imports no defense module.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from torch import nn


def broadcast_from_main(trainer, model: nn.Module) -> None:
    """Give every process the main process's weights (each ran the same seeded computation; this makes them equal)."""
    if trainer.accelerator.num_processes <= 1:
        return
    import torch.distributed as dist

    for tensor in model.state_dict().values():
        dist.broadcast(tensor.data, src=0)


def broadcast_object(trainer, obj):
    """The main process's ``obj`` on every process."""
    if trainer.accelerator.num_processes <= 1:
        return obj
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([obj], from_process=0)[0]


def jsonable(value):
    """``value`` with numpy scalars and tensors turned into plain Python numbers and lists."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if torch.is_tensor(value):
        return jsonable(value.tolist())
    return value


def log_and_write(trainer, prefix: str, scalars: dict[str, float], path: str, report: dict) -> None:
    """Log ``scalars`` under ``prefix/`` through the trainer's loggers and write ``report`` to ``path`` (main process)."""
    trainer.log({f"{prefix}/{k}": v for k, v in scalars.items()})
    if trainer.is_world_process_zero():
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
