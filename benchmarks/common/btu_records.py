"""What a BTU run adds to its record (``recipes/sst2_btu.py``, ``benchmarks/text_btu.py``), and the floors and
overheads that tie a recipe's runs together."""

from __future__ import annotations

import dataclasses

import numpy as np

from hf_backdoor.defenses import BTUConfig
from hf_backdoor.metrics import detection_metrics

from .records import device_name, shown


def btu_variant(config: BTUConfig, paper: bool) -> str:
    """``paper`` for ``BTUConfig.paper()``, ``default`` for ``BTUConfig()``, else the fields that differ from the
    default (seed aside), e.g. ``isolated_rows=mask``; part of a ``text_btu.json`` record's key."""
    if paper:
        return "paper"
    default = BTUConfig(seed=config.seed)
    changed = [
        f"{f.name}={getattr(config, f.name)}"
        for f in dataclasses.fields(BTUConfig)
        if getattr(config, f.name) != getattr(default, f.name)
    ]
    return ",".join(changed) or "default"


def paper_fields() -> dict:
    """The fields ``BTUConfig.paper()`` sets apart from ``BTUConfig()``: a recipe's defaults for ``--btu_paper``."""
    paper, default = BTUConfig.paper(), BTUConfig()
    return {
        f.name: getattr(paper, f.name)
        for f in dataclasses.fields(BTUConfig)
        if getattr(paper, f.name) != getattr(default, f.name)
    }


def trigger_tokens(attack, tokenizer) -> list[str]:
    """The tokens an attack's trigger becomes (BadNet's words, AddSent's sentence); none for paraphrase attacks."""
    if hasattr(attack, "triggers"):
        return [t for word in attack.triggers for t in tokenizer.tokenize(word)]
    if hasattr(attack, "trigger"):
        return tokenizer.tokenize(attack.trigger)
    return []


def btu_fields(report: dict, attack, tokenizer, variant: str, train) -> dict:
    """A BTU run's record fields: what it flagged against the real trigger tokens, the rows it isolated (precision
    and recall against the poisoned rows when the training set says which they are) and the time of each phase."""
    triggers = trigger_tokens(attack, tokenizer)
    fields = {
        "btu_variant": variant,
        "flagged_tokens": " ".join(report["flagged_tokens"]),
        "num_flagged": len(report["flagged_ids"]),
        "num_candidates": len(report["candidate_ids"]),
        "trigger_tokens": " ".join(triggers),
        "trigger_tokens_flagged": " ".join(t for t in triggers if t in report["flagged_tokens"]),
        "num_isolated_rows": report["num_isolated_rows"],
        "phase_names": " ".join(report["timings_s"]),
        **report["timings_s"],
    }
    if "poisoned" in train.column_names:
        flags = np.zeros(len(train), dtype=int)
        flags[report["isolated_row_indices"]] = 1
        detection = detection_metrics(flags, train["poisoned"])
        fields.update({"isolation_precision": detection["precision"], "isolation_recall": detection["recall"]})
    return fields


def fill_floors_and_overheads(records: list[dict]) -> None:
    """ASR floor = the clean run's ASR on the same triggered rows; overhead = wall time over the plain run on the
    same training data (the undefended run, or the clean run for a defense trained on clean data)."""
    by_run = {(r["run"], r["attack"], r["asr_attack"]): r for r in records}
    for record in records:
        clean = by_run.get(("clean", "none", record["asr_attack"]))
        if clean is not None:
            record["asr_floor"] = clean["asr"]
        if record["defense"] == "none":
            record["overhead"] = 1.0
            continue
        plain_run = "clean" if record["attack"] == "none" else "undefended"
        plain = by_run.get((plain_run, record["attack"], record["asr_attack"]))
        if plain is not None:
            record["overhead"] = round(record["wall_s"] / plain["wall_s"], 3)


def run_record(
    dataset: str,
    run: str,
    attack,
    scored_attack,
    evaluation,
    result,
    training_args,
    *,
    model: str,
    command: str,
    asr_floor: float | None,
) -> dict:
    """The record of one recipe run (``clean``, ``undefended``, ``btu``; ``attack`` is ``None`` for clean training
    data) scored on ``scored_attack``'s triggered rows; ``result`` is its ``runs.RunResult``."""
    return {
        "dataset": dataset,
        "attack": "none" if attack is None else attack.name,
        "defense": "btu" if run == "btu" else "none",
        "model": model,
        "poison_rate": 0.0 if attack is None else attack.poison_rate,
        "cacc": evaluation.cacc,
        "asr": evaluation.asr,
        "asr_floor": asr_floor,
        "wall_s": round(result.wall_s, 2),
        "overhead": None,
        "device": device_name(),
        "seed": training_args.seed,
        "command": command,
        "run": run,
        "asr_attack": scored_attack.name,
        "target_label": scored_attack.target_label,
        "epochs": training_args.num_train_epochs,
        "learning_rate": training_args.learning_rate,
        "train_samples_per_s": round(result.train_samples_per_s, 1),
    }


def print_run(name: str, record: dict) -> None:
    """One run's result line, printed as soon as the run ends."""
    floor = shown(record["asr_floor"])
    print(
        f"[{name}] on {record['asr_attack']} rows: CACC {record['cacc']:.3f}  ASR {record['asr']:.3f}  "
        f"ASR floor {floor}  trained in {record['wall_s']:.1f} s",
        flush=True,
    )


def print_summary(records: list[dict], title: str) -> None:
    """The table of every run, then what BTU flagged and the time of its phases."""
    print(f"\n{title}")
    print(f"{'run':<12}{'attack':<11}{'CACC':>8}{'ASR':>8}{'floor':>8}{'wall s':>9}{'overhead':>10}  flagged")
    for r in records:
        floor = shown(r["asr_floor"])
        overhead = shown(r["overhead"], ".2f", "x")
        print(
            f"{r['run']:<12}{r['asr_attack']:<11}{r['cacc']:>8.3f}{r['asr']:>8.3f}{floor:>8}{r['wall_s']:>9.1f}"
            f"{overhead:>10}  {r.get('flagged_tokens', '')}"
        )
    described = set()
    for r in records:
        if r["run"] == "btu" and r["attack"] not in described:
            described.add(r["attack"])
            phases = ", ".join(f"{k} {r[k]:.1f}" for k in r["phase_names"].split())
            print(
                f"btu on {r['attack']}: flagged {r['flagged_tokens'].split()} of {r['num_candidates']} candidates; "
                f"{r['num_isolated_rows']} rows isolated; phases (s): {phases}"
            )
