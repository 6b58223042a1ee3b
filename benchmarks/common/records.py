"""Result records: the flat dicts of ``benchmarks/results/*.json``, how they are written, merged and given a floor.

Every record has ``dataset``, ``attack``, ``defense``, ``model``, ``poison_rate``, ``cacc``, ``asr``, ``asr_floor``,
``wall_s``, ``overhead``, ``device``, ``seed`` and ``command``, plus the fields of its script. Records already in
``results/`` are never rewritten by hand: a script replaces a record only by writing a new one with the same key.
"""

from __future__ import annotations

import json
import os
import shlex
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results"


def cpu_description() -> str:
    """The CPU's name, its core count and whether it has the bf16 instructions torch's kernels use."""
    from hf_backdoor.trainer import cpu_bf16_flags

    name = "cpu"
    try:
        name = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        pass
    isa = cpu_bf16_flags() or ["no bf16 instructions"]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"cpu: {name}, {cores} cores, {'+'.join(isa)}, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})"


def device_name() -> str:
    """The device a record was measured on: the GPU's name, or the CPU (its name and instruction set: the same
    seeded run gives other numbers on another CPU's kernels) with its torch thread count."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_description()}, {torch.get_num_threads()} threads"


def dataset_name(dataset: str) -> str:
    """The short name records give a dataset: ``cifar10`` for the packaged copy, the reference npz or the Hub
    dataset; a local file's stem; a task name or Hub id as it is."""
    stem = Path(dataset).stem if Path(dataset).exists() else dataset
    return "cifar10" if stem.startswith("cifar10") or dataset == "uoft-cs/cifar10" else stem


def command_line(script: str, argv: Iterable[str]) -> str:
    """The command that reproduces a run, ``python <script> <argv>``, quoted for a POSIX shell."""
    return "python " + shlex.join([script, *argv])


def recipe_records(recipe: str, recipe_args: list[str], work_dir: Path, results_name: str) -> list[dict]:
    """Run ``recipes/<recipe>`` in a subprocess (so its own record names its command exactly) with ``recipe_args``,
    its models under ``work_dir/runs``, and return the records it wrote to ``work_dir/<results_name>``."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[2]
    out = work_dir / results_name
    command = [sys.executable, str(root / "recipes" / recipe), *recipe_args]
    command += ["--output_dir", str(work_dir / "runs"), "--results_json", str(out)]
    subprocess.run(command, check=True, cwd=root)
    return json.loads(out.read_text())


def shown(value, spec: str = ".3f", unit: str = "") -> str:
    """A table cell: ``value`` formatted by ``spec`` with its ``unit``, or ``-`` where it was not measured."""
    return "-" if value is None else f"{format(value, spec)}{unit}"


def write_records(path: str | Path, records: list[dict]) -> None:
    """Write ``records`` as an indented JSON list (the format of ``results/*.json``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n")


def known_records(extra: list[dict] = (), extra_source: str = "this run") -> list[tuple[str, dict]]:
    """``(source, record)`` for ``extra`` (records not written yet) and every record of ``results/*.json`` (files
    that hold a JSON list of records; other JSON kept there, such as a script's own summary object, is not read)."""
    known = [(extra_source, r) for r in extra]
    for path in sorted(RESULTS.glob("*.json")):
        stored = json.loads(path.read_text())
        if isinstance(stored, list):
            known += [(f"benchmarks/results/{path.name}", r) for r in stored if isinstance(r, dict)]
    return known


def fill_floors(records: list[dict], known: list[tuple[str, dict]], attack_field: str = "asr_attack") -> None:
    """Give a record without ``asr_floor`` the ASR of a clean model (attack and defense ``none``) of the same dataset,
    model and seed on the same triggered rows (the ASR set is built from the test split by the same seeded builder);
    ``asr_floor_source`` says where it came from. A clean model measured on the record's own device is preferred (the
    same seeded run gives other numbers on another device's kernels); one from another device is used only where
    none exists, and the source names that device."""
    clean_models: dict[tuple, list[tuple[str, dict]]] = {}
    for source, record in known:
        if record["attack"] == "none" and record["defense"] == "none" and record.get("asr") is not None:
            key = (record["dataset"], record.get("asr_attack"), record["model"], crop_key(record), record["seed"])
            clean_models.setdefault(key, []).append((source, record))
    for record in records:
        if record.get("asr_floor") is not None:
            continue
        attack = record.get(attack_field)
        if attack is None:  # e.g. a model-detection record: no ASR, so no floor
            continue
        found = clean_models.get((record["dataset"], attack, record["model"], crop_key(record), record["seed"]))
        if not found:
            continue
        same_device = [(s, r) for s, r in found if r.get("device") == record.get("device")]
        source, clean = (same_device or found)[0]
        record["asr_floor"] = clean["asr"]
        where = "" if same_device else f", measured on another device ({clean.get('device', 'not recorded')})"
        record["asr_floor_source"] = (
            f"{source}: the clean model of `{clean['command']}` on the same {attack} rows{where}"
        )


def crop_key(record: dict) -> int | None:
    """The random-crop padding an image model was trained with, ``None`` for the default 4 and for records without
    the field: a ViT trained without the crop is another model, whose clean control is another model too."""
    crop = record.get("crop_padding")
    return None if crop in (None, 4) else crop


def merge_records(output: Path, new_records: list[dict], key: Callable[[dict], tuple]) -> list[dict]:
    """Write ``output`` with ``new_records`` replacing the existing records of the same key; returns all of them."""
    output = Path(output)
    existing = json.loads(output.read_text()) if output.exists() else []
    replaced = {key(r) for r in new_records}
    merged = [r for r in existing if key(r) not in replaced] + new_records
    write_records(output, merged)
    return merged


def defenses_record_key(record: dict) -> tuple:
    """The key of the ``vision_defenses.py`` and ``text_defenses.py`` records (``exposure_label_control.py`` adds its
    ``control`` to it): two records of the same key are the same measurement, and the newer replaces the older."""
    return tuple(
        record.get(k)
        for k in (
            "section",
            "dataset",
            "attack",
            "defense",
            "model",
            "seed",
            "asr_attack",
            "poison_rate",
            "epochs",
            "crop_padding",
            "abl_config",
        )
    ) + (
        record.get("cul_method", "cul" if record.get("defense") == "cul" else None),
        record.get("cul_clean_fraction", 0.01),  # written before it could change: EBYD's 1%
        record.get("cul_clean_from", "train"),
        record.get("cul_augmentation"),  # trained on augmented or stored images (None before stop 47)
        record.get("model_key"),  # a saved model exposed by --cul-models (two of one seed can differ: bf16, compile)
        record.get("attack_kwargs"),  # an attack's non-default settings (JSON text), e.g. a stronger WaNet warp
        record.get("cul_kwargs"),  # the exposure's non-default settings (JSON text)
    )


class RecordWriter:
    """Merges records into ``output`` as they come (a long run stopped later keeps what it finished), each given an
    ASR floor from a clean model on the same rows when it has none; ``written`` holds this run's records. A record
    written again (an exposure, once the detection threshold is known) replaces its earlier copy."""

    def __init__(self, output: str | Path, key: Callable[[dict], tuple] = defenses_record_key):
        self.output, self.key, self.written = Path(output), key, []

    def __call__(self, records: list[dict]) -> None:
        fill_floors(records, known_records(self.written + records))
        merge_records(self.output, records, self.key)
        keys = {self.key(r) for r in records}
        self.written = [r for r in self.written if self.key(r) not in keys] + records


def print_defense_records(records: list[dict]) -> None:
    """The table of ``vision_defenses.py`` / ``text_defenses.py``: CACC, ASR, floor, overhead in epochs, and each
    defense's notes (ABL's isolation, CUL's label and score, the CUL filter's removed rows), then model detection."""

    print(
        f"\n{'section':<11}{'attack':<10}{'defense':<11}{'seed':>5}{'CACC':>7}{'ASR':>7}{'floor':>7}{'overhead':>9}  notes"
    )
    for r in records:
        notes = []
        if r.get("abl_isolation_precision") is not None:
            notes.append(f"isolation P/R {r['abl_isolation_precision']:.2f}/{r['abl_isolation_recall']:.2f}")
        if "cul_label" in r and r["defense"] == "cul":
            notes.append(
                f"label {r['cul_label']} ({'right' if r.get('cul_label_correct') else 'wrong/-'}), "
                f"score {r['cul_score']:.3f}, acc {r['cul_clean_acc_before']:.2f}->{r['cul_clean_acc_after']:.2f}"
            )
        if r.get("cul_row_auroc") is not None:
            notes.append(f"row AUROC {r['cul_row_auroc']:.2f}")
        if r.get("removed_rows") is not None:
            notes.append(f"removed {r['removed_rows']} (P {r['removed_precision']:.2f}, R {r['removed_recall']:.2f})")
        overhead = shown(r.get("overhead_epochs"), ".2f", "ep")
        print(
            f"{r['section']:<11}{r['attack']:<10}{r['defense']:<11}{r['seed']:>5}{shown(r['cacc']):>7}"
            f"{shown(r['asr']):>7}{shown(r['asr_floor']):>7}{overhead:>9}  {'; '.join(notes)}"
        )
    for section in sorted({r["section"] for r in records}):
        detection = [r for r in records if "detection_auroc" in r and r["section"] == section]
        if detection:
            flagged = sum(r["flagged"] for r in detection if r["backdoored"])
            print(
                f"CUL model detection ({section}): AUROC {detection[0]['detection_auroc']:.3f}; threshold "
                f"{detection[0]['detection_threshold']:.3f} (max over clean models) flags {flagged} of "
                f"{sum(r['backdoored'] for r in detection)} backdoored models"
            )
