"""What the benchmark scripts share: reading the records in ``benchmarks/results/``, finding an ASR floor measured
on the same rows, and merging new records into a results file."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def known_records(extra: list[dict] = (), extra_source: str = "this run") -> list[tuple[str, dict]]:
    """``(source, record)`` for ``extra`` (records not written yet) and every record of ``results/*.json``."""
    known = [(extra_source, r) for r in extra]
    for path in sorted(RESULTS.glob("*.json")):
        known += [(f"benchmarks/results/{path.name}", r) for r in json.loads(path.read_text())]
    return known


def fill_floors(records: list[dict], known: list[tuple[str, dict]], attack_field: str = "asr_attack") -> None:
    """Give a record without ``asr_floor`` the ASR of a clean model (attack and defense ``none``) of the same dataset,
    model and seed on the same triggered rows (the ASR set is built from the test split by the same seeded builder);
    ``asr_floor_source`` says where it came from."""
    clean_models = {}
    for source, record in known:
        if record["attack"] == "none" and record["defense"] == "none" and record.get("asr") is not None:
            key = (record["dataset"], record.get("asr_attack"), record["model"], record["seed"])
            clean_models.setdefault(key, (source, record))
    for record in records:
        if record.get("asr_floor") is not None:
            continue
        attack = record.get(attack_field)
        if attack is None:  # e.g. a model-detection record: no ASR, so no floor
            continue
        found = clean_models.get((record["dataset"], attack, record["model"], record["seed"]))
        if found is not None:
            source, clean = found
            record["asr_floor"] = clean["asr"]
            record["asr_floor_source"] = f"{source}: the clean model of `{clean['command']}` on the same {attack} rows"


def merge_records(output: Path, new_records: list[dict], key: Callable[[dict], tuple]) -> list[dict]:
    """Write ``output`` with ``new_records`` replacing the existing records of the same key; returns all of them."""
    existing = json.loads(output.read_text()) if output.exists() else []
    replaced = {key(r) for r in new_records}
    merged = [r for r in existing if key(r) not in replaced] + new_records
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(merged, indent=1) + "\n")
    return merged
