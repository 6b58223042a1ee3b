"""What every recipe does first: use the CPU cores ``accelerate launch`` left idle, and replace the load report of a
freshly initialised classification head with one line."""

from __future__ import annotations

import argparse
import logging
import os
import re

import torch
import transformers


class RecipeHelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` of a recipe: its docstring as written, and every flag's default."""


# Set by accelerate's launcher in the process it starts, whatever the machine.
_LAUNCHED_BY_ACCELERATE = "ACCELERATE_DYNAMO_BACKEND"
# Parameter names of the classification heads `AutoModelFor*Classification` adds on top of a pretrained encoder.
_HEAD_PREFIXES = ("classifier.", "score.", "pre_classifier.")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _parent_was_told_the_thread_count() -> bool:
    """Whether the user chose the thread count for ``accelerate launch`` (``OMP_NUM_THREADS`` in its environment or
    ``--num_cpu_threads_per_process`` on its command line), read from the launcher process (Linux ``/proc``).
    Where that cannot be read, the user is assumed not to have chosen."""
    parent = f"/proc/{os.getppid()}"
    try:
        with open(f"{parent}/environ", "rb") as environ, open(f"{parent}/cmdline", "rb") as cmdline:
            variables, arguments = environ.read().split(b"\0"), cmdline.read().split(b"\0")
    except OSError:
        return False
    return any(v.startswith(b"OMP_NUM_THREADS=") for v in variables) or any(
        a.split(b"=")[0] in (b"--num_cpu_threads_per_process", b"--num-cpu-threads-per-process") for a in arguments
    )


def use_all_cpu_cores() -> None:
    """Undo the one-thread default of ``accelerate launch`` on a single-process CPU run.

    Without a config saying the run is on CPU, accelerate's launcher sets ``OMP_NUM_THREADS=1`` in the process it
    starts, so torch trains on one core however many the machine has. When the recipe was started by ``accelerate launch``, runs as one process, has no
    GPU, and the user set neither ``OMP_NUM_THREADS`` nor ``--num_cpu_threads_per_process``, torch gets every core
    this process may run on. Several processes (``--num_processes 2``) share the cores and keep accelerate's count.
    """
    if _LAUNCHED_BY_ACCELERATE not in os.environ or os.environ.get("OMP_NUM_THREADS") != "1":
        return
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 or torch.cuda.is_available() or _parent_was_told_the_thread_count():
        return
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores > 1:
        torch.set_num_threads(cores)
        os.environ["OMP_NUM_THREADS"] = str(cores)  # for the processes this one starts (dataloader workers)
        print(
            f"accelerate launch set OMP_NUM_THREADS=1 for this CPU run; training on all {cores} cores instead "
            "(choose with `accelerate launch --num_cpu_threads_per_process N`)."
        )


class _NewHeadReport(logging.Filter):
    """Drops transformers' load report when all it lists is a classification head missing from the checkpoint (the
    head a fine-tuning run starts from, freshly initialised) and prints one line saying so. Any other report (keys
    unexpected, mismatched, or missing outside the head) passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = _ANSI.sub("", record.getMessage())
        if "LOAD REPORT" not in message:
            return True
        rows = [[cell.strip() for cell in line.split("|")] for line in message.splitlines() if "|" in line]
        rows = [row for row in rows if len(row) >= 2 and row[0] not in ("Key", "") and not set(row[0]) <= {"-", "+"}]
        if not rows or any(status != "MISSING" or not key.startswith(_HEAD_PREFIXES) for key, status, *_ in rows):
            return True
        model = message.split(" LOAD REPORT", 1)[0].strip()
        if int(os.environ.get("RANK", "0")) == 0:
            print(
                f"{model}: new classification head ({', '.join(sorted(k for k, *_ in rows))}) initialised, as expected."
            )
        return False


_HEAD_REPORT_FILTER = _NewHeadReport()


def device_defaults() -> dict:
    """``TrainingArguments`` defaults for this machine: ``use_cpu=True`` where torch sees no accelerator, so that
    ``--bf16`` (a real speed lever on CPUs with bf16 instructions) trains under CPU autocast instead of stopping with
    transformers' "doesn't support bf16/gpu" error. Where a GPU, XPU, MPS or XLA device is present, nothing changes."""
    from transformers.utils import is_torch_xla_available

    return {} if torch.accelerator.is_available() or is_torch_xla_available() else {"use_cpu": True}


def quiet_new_head_report() -> None:
    """Replace the ``classifier.* MISSING`` load report of every freshly initialised head with one line (idempotent)."""
    logger = transformers.logging.get_logger("transformers.modeling_utils")
    if _HEAD_REPORT_FILTER not in logger.filters:
        logger.addFilter(_HEAD_REPORT_FILTER)


def prepare_recipe_process() -> None:
    """Both of the above: the first call of every recipe's ``main``."""
    use_all_cpu_cores()
    quiet_new_head_report()
