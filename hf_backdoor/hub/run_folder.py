"""A run's output folder: what a run wrote there, which run wrote it, and files others can read.

Two records tie the folder's files to one run id:

- ``hf_backdoor_run.json``, written by ``BackdoorSafeTrainer`` when it saves (``{"run_id", "defenses"}``), with the
  same ``run_id`` inside ``defense_report.json``;
- ``run_info.json``, written by the CLI when a run starts (``status: "running"``) and again when it ends, with the
  SHA-256 of the report files the run wrote (``files``), the command line and the wall time.

A reader (:func:`check_run_folder`, used by ``hf-backdoor report``) refuses a folder without a model, a run that did
not finish, and a ``defense_report.json`` that run did not write (a leftover of an earlier, interrupted run in the
same folder), instead of drawing a report of a defense that never ran on the model beside it.

``run_info.json`` also keeps ``wall_s`` and ``epochs`` (the training's wall time), the fields
``benchmarks.common.runs.saved_training_wall`` reads, so a CLI run folder works as a cached model for the recipes.
A folder saved by a script (``trainer.save_model``) has no ``run_id``: it is read as it is, unchecked.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import shutil
import stat
import uuid
from pathlib import Path
from typing import Any

RUN_INFO_NAME = "run_info.json"
TRAINER_RUN_NAME = "hf_backdoor_run.json"  # BackdoorSafeTrainer's record of the run that saved the folder
DEFENSE_REPORT_NAME = "defense_report.json"
EVALUATIONS_NAME = "backdoor_evaluations.json"
# The files whose content run_info.json vouches for.
TIED_FILES = (DEFENSE_REPORT_NAME, EVALUATIONS_NAME)
# What a run writes besides the model itself (glob patterns); removed before a new run writes into the same folder.
RUN_ARTEFACTS = (
    *TIED_FILES,
    RUN_INFO_NAME,
    TRAINER_RUN_NAME,
    "report.md",
    "README.md",
    "figures",
    "sanitize_report_*.json",  # each repair's own report (sanitize_model)
)
# The weight files transformers and peft save: a folder with one of them holds a model.
MODEL_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.safetensors",
    "adapter_model.bin",
)


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def sha256_of_file(path: Path) -> str:
    """The file's sha256, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _umask() -> int:
    # os.umask can only be read by setting it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def make_readable(path: str | os.PathLike) -> None:
    """Give ``path`` (and everything under a folder) the read permissions the umask allows (0644 files, 0755
    folders under the usual umask 022).

    safetensors writes ``model.safetensors`` through a private temporary file (mode 0600) and renames it, and
    ``tempfile.mkdtemp`` folders are 0700, so a saved model is otherwise readable by its owner only: a shared machine's
    other users, a container running under another uid or a web server could not read it.
    """
    allowed = ~_umask() & 0o777
    root = Path(path)
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for p in paths:
        if p.is_symlink() or not p.exists():
            continue
        mode = stat.S_IMODE(p.stat().st_mode)
        wanted = mode | ((0o755 if p.is_dir() else 0o644) & allowed)
        if wanted != mode:
            os.chmod(p, wanted)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON through a temporary file and a rename (no half-written file after a crash), readable by others."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(obj, indent=1) + "\n")
        make_readable(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def has_model(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds saved model weights (see ``MODEL_WEIGHT_FILES``)."""
    folder = Path(folder)
    return any((folder / name).is_file() for name in MODEL_WEIGHT_FILES)


def run_artefacts(folder: str | os.PathLike) -> list[Path]:
    """The files and folders an earlier run left in ``folder`` (see ``RUN_ARTEFACTS``)."""
    folder = Path(folder)
    return sorted({path for pattern in RUN_ARTEFACTS for path in folder.glob(pattern)})


def is_run_folder(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` was written by a run of this library (it has a run record or a run report file)."""
    folder = Path(folder)
    return any((folder / name).is_file() for name in (RUN_INFO_NAME, TRAINER_RUN_NAME, *TIED_FILES))


def clear_run_artefacts(folder: str | os.PathLike) -> list[str]:
    """Remove an earlier run's report files, card and figures from ``folder`` (its weights are left to be
    overwritten); returns the names removed."""
    removed = []
    for path in run_artefacts(folder):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        removed.append(path.name)
    return removed


def new_run_id() -> str:
    """A run id that sorts by start time and does not collide: ``20250102-153012-1a2b3c``."""
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}); the run that wrote it did not finish.") from None


def read_run_info(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The CLI's ``run_info.json`` in ``folder``, if any."""
    info = _read_json(Path(folder) / RUN_INFO_NAME)
    return info if isinstance(info, dict) else None


def _check_trainer_record(folder: Path) -> None:
    """``defense_report.json`` must carry the run id of the trainer that saved the folder, and exist when that run
    had defenses."""
    record = _read_json(folder / TRAINER_RUN_NAME)
    if not isinstance(record, dict) or "run_id" not in record:
        return
    report_path = folder / DEFENSE_REPORT_NAME
    report = _read_json(report_path)
    if report is not None:
        report_run = report.get("run_id") if isinstance(report, dict) else None
        if report_run != record["run_id"]:
            raise ValueError(
                f"{report_path} belongs to run {report_run or '(unrecorded)'}, but the model in {folder} was saved by "
                f"run {record['run_id']}: it is left over from an earlier run. Delete it, or run again into an empty "
                "folder."
            )
    elif record.get("defenses"):
        raise FileNotFoundError(
            f"The run that saved {folder} ran {record['defenses']}, but {report_path} is missing. Run it again."
        )


def start_run(folder: str | os.PathLike, command: str, argv: list[str] | None = None, **fields) -> dict[str, Any]:
    """Write ``run_info.json`` for a run that starts now; returns the record (``finish_run`` completes it)."""
    from importlib import metadata

    try:
        version = metadata.version("hf-backdoor")
    except metadata.PackageNotFoundError:
        version = None
    info = {
        "run_id": new_run_id(),
        "command": command,
        "argv": list(argv) if argv is not None else None,
        "status": "running",
        "started": _now(),
        "hf_backdoor": version,
        **fields,
    }
    Path(folder).mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(folder) / RUN_INFO_NAME, info)
    return info


def finish_run(folder: str | os.PathLike, info: dict[str, Any], **fields) -> dict[str, Any]:
    """Mark the run finished and record the hashes of the report files it wrote, tying them to its ``run_id``."""
    folder = Path(folder)
    files = {name: sha256_of_file(folder / name) for name in TIED_FILES if (folder / name).is_file()}
    info = {**info, **fields, "status": "finished", "finished": _now(), "files": files}
    write_json_atomic(folder / RUN_INFO_NAME, info)
    return info


def check_run_folder(folder: str | os.PathLike) -> dict[str, Any] | None:
    """Check that ``folder`` holds a saved model and that its report files belong to the run that saved it.

    Returns the run record (``None`` for a folder saved without one). Raises ``FileNotFoundError`` for a folder
    without a model and ``ValueError`` for a run that did not finish or a report file it did not write.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder: point at the output folder of a train or sanitize run.")
    if not has_model(folder):
        raise FileNotFoundError(
            f"{folder} holds no saved model (none of {', '.join(MODEL_WEIGHT_FILES)}): point at the output folder of "
            "a train or sanitize run (a scan writes no model) or of `trainer.save_model(...)`."
        )
    _check_trainer_record(folder)
    info = read_run_info(folder)
    if not info or "run_id" not in info:
        return info
    run = f"run {info['run_id']} ({info.get('command', 'unknown command')}, started {info.get('started', '?')})"
    if info.get("status") != "finished":
        raise ValueError(
            f"{run} in {folder} did not finish: the model and reports there may be from an earlier run. Run it again."
        )
    recorded = info.get("files") or {}
    for name in TIED_FILES:
        path = folder / name
        if path.is_file() and name not in recorded:
            raise ValueError(
                f"{path} was not written by {run}, which wrote no {name}: it is left over from an earlier run. "
                "Delete it, or run again into an empty folder."
            )
        if path.is_file() and sha256_of_file(path) != recorded[name]:
            raise ValueError(f"{path} is not the file {run} wrote (its content changed). Run again to rebuild it.")
        if not path.is_file() and name in recorded:
            raise FileNotFoundError(f"{run} wrote {name}, but {path} is missing. Run again to rebuild it.")
    return info
