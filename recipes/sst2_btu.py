"""BTU during fine-tuning: the same poisoned data trained with the plain ``Trainer`` and with ``BackdoorSafeTrainer``.

    accelerate launch recipes/sst2_btu.py                   # SST-2, BadNet 10% target 1, offline default model
    python recipes/sst2_btu.py --dataset hsol --attack addsent
    python recipes/sst2_btu.py --paper                      # the published BTU procedure instead of the default
    python recipes/sst2_btu.py --runs btu                   # only the defended run

Prints CACC and ASR without and with BTU beside the ASR floor (a model trained on the clean data, on the same
triggered rows), the flagged tokens, and the wall time of each phase; ``--results-json`` writes the records.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from hf_backdoor import (
    ATTACKS,
    default_text_model,
    load_text_tokenizer,
    make_asr_dataset,
    poison_dataset,
    tokenize_dataset,
)
from hf_backdoor.data import TASKS
from hf_backdoor.defenses import BTUConfig
from hf_backdoor.experiments import (
    TextRunSettings,
    attack_for_task,
    device_name,
    fine_tune_and_evaluate,
    load_experiment_task,
)
from hf_backdoor.metrics import detection_metrics, evaluate_backdoor
from hf_backdoor.models import model_display_name

RUNS = ("clean", "undefended", "btu")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="sst2", help=f"packaged task ({', '.join(TASKS)}), Hub id or local path")
    parser.add_argument(
        "--attack",
        default="badnet",
        help=f"attack, or several comma-separated sharing one clean model ({', '.join(sorted(ATTACKS))})",
    )
    parser.add_argument("--poison-rate", type=float, default=0.1)
    parser.add_argument(
        "--triggers", default=None, help="BadNet trigger words, comma-separated (default: cf,mn,bb,tq,mb)"
    )
    parser.add_argument("--target-label", type=int, default=None, help="default: the task's usual target")
    parser.add_argument("--model", default=None, help="Hub id or local path (default: the packaged MiniLM-L6)")
    parser.add_argument(
        "--clean-data",
        action="store_true",
        help="train every run on the unpoisoned data (shows what BTU flags and costs when there is no backdoor)",
    )
    parser.add_argument("--paper", action="store_true", help="the published BTU procedure (BTUConfig.paper())")
    parser.add_argument("--flip-threshold", type=float, default=0.65)
    parser.add_argument("--reset-to", default="padding", choices=["padding", "pretrained"])
    parser.add_argument(
        "--isolated-rows",
        default="relabel",
        choices=["relabel", "mask", "none"],
        help="what later epochs do with the rows the flagged tokens decide (see BTUConfig.isolated_rows)",
    )
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--output-dir", default="runs/btu")
    parser.add_argument("--results-json", default=None)
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or set(runs) - set(RUNS):
        raise SystemExit(f"--runs must list some of {RUNS}, got {args.runs!r}")
    attack_names = [a.strip() for a in args.attack.split(",") if a.strip()]
    if not attack_names or set(attack_names) - set(ATTACKS):
        raise SystemExit(f"--attack must list some of {sorted(ATTACKS)}, got {args.attack!r}")
    model_name = args.model or default_text_model()
    task = load_experiment_task(args.dataset, args.max_train_samples, args.max_eval_samples, args.seed)
    label_names = task["train"].features["label"].names
    attacks = [
        attack_for_task(
            name,
            args.dataset,
            poison_rate=args.poison_rate,
            target_label=args.target_label,
            seed=args.seed,
            triggers=args.triggers,
        )
        for name in attack_names
    ]
    target = attacks[0].target_label
    tokenizer = load_text_tokenizer(model_name)
    poisoned = {a.name: poison_dataset(task["train"], a, tokenizer=tokenizer) for a in attacks}
    test_set = tokenize_dataset(task["test"], tokenizer, args.max_length)
    asr_sets = {
        a.name: tokenize_dataset(make_asr_dataset(task["test"], a), tokenizer, args.max_length) for a in attacks
    }
    defense = (
        BTUConfig.paper(seed=args.seed)
        if args.paper
        else BTUConfig(
            flip_threshold=args.flip_threshold,
            reset_to=args.reset_to,
            isolated_rows=args.isolated_rows,
            seed=args.seed,
        )
    )
    variant = "paper" if args.paper else _variant_name(defense)
    settings = TextRunSettings(
        model_name=model_name,
        learning_rate=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        bf16=args.bf16,
    )
    command = "python " + shlex.join(["recipes/sst2_btu.py", *(sys.argv[1:] if argv is None else argv)])
    # A run on clean data is trained once and scored on every attack's triggered rows (the clean model's score
    # there is each attack's ASR floor); a run on poisoned data is trained once per attack.
    jobs = [(run, attack) for run in runs for attack in ([None] if run == "clean" or args.clean_data else attacks)]
    records, trainers = [], []
    for run, attack in jobs:
        train = poisoned[attack.name] if attack is not None else task["train"]
        scored = [attack] if attack is not None else attacks
        name = run if attack is None or len(attacks) == 1 else f"{run}_{attack.name}"
        result = fine_tune_and_evaluate(
            settings,
            label_names,
            train,
            test_set,
            asr_sets[scored[0].name],
            Path(args.output_dir) / name,
            defense=defense if run == "btu" else None,
            target_label=target,
        )
        trainers.append(result.trainer)
        for scored_attack in scored:
            evaluation = result.evaluation
            if scored_attack is not scored[0]:
                evaluation = evaluate_backdoor(result.trainer, test_set, asr_sets[scored_attack.name], target)
            record = {
                "dataset": args.dataset,
                "attack": "none" if attack is None else attack.name,
                "defense": "btu" if run == "btu" else "none",
                "model": model_display_name(model_name),
                "poison_rate": 0.0 if attack is None else attack.poison_rate,
                "cacc": evaluation.cacc,
                "asr": evaluation.asr,
                "asr_floor": None,
                "wall_s": round(result.wall_s, 2),
                "overhead": None,
                "device": device_name(),
                "seed": args.seed,
                "command": command,
                "run": run,
                "asr_attack": scored_attack.name,
                "target_label": target,
                "epochs": args.epochs,
                "learning_rate": args.lr,
                "train_samples_per_s": round(result.train_samples_per_s, 1),
            }
            if run == "btu":
                record.update(_btu_fields(result.trainer.defense_report, scored_attack, tokenizer, variant, train))
            records.append(record)
    _fill_floors_and_overheads(records)

    if trainers[-1].is_world_process_zero():
        print(
            f"\n{args.dataset} / rate {attacks[0].poison_rate} target {target} / {model_display_name(model_name)} / "
            f"BTU {variant}{' / trained on clean data' if args.clean_data else ''}"
        )
        print(f"{'run':<12}{'attack':<11}{'CACC':>8}{'ASR':>8}{'floor':>8}{'wall s':>9}{'overhead':>10}  flagged")
        for record in records:
            floor = "-" if record["asr_floor"] is None else f"{record['asr_floor']:.3f}"
            overhead = "-" if record["overhead"] is None else f"{record['overhead']:.2f}x"
            print(
                f"{record['run']:<12}{record['asr_attack']:<11}{record['cacc']:>8.3f}{record['asr']:>8.3f}{floor:>8}"
                f"{record['wall_s']:>9.1f}{overhead:>10}  {record.get('flagged_tokens', '')}"
            )
        described = set()
        for record in records:
            if record["run"] == "btu" and record["attack"] not in described:
                described.add(record["attack"])
                print(
                    f"btu on {record['attack']}: flagged {record['flagged_tokens'].split()} of "
                    f"{record['num_candidates']} candidates; {record['num_isolated_rows']} rows isolated; phases (s): "
                    + ", ".join(f"{k} {record[k]:.1f}" for k in record["phase_names"].split())
                )
        if args.results_json:
            Path(args.results_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.results_json).write_text(json.dumps(records, indent=1) + "\n")
    return records


def _btu_fields(report: dict, attack, tokenizer, variant: str, train) -> dict:
    trigger_tokens = _trigger_tokens(attack, tokenizer)
    fields = {
        "btu_variant": variant,
        "flagged_tokens": " ".join(report["flagged_tokens"]),
        "num_flagged": len(report["flagged_ids"]),
        "num_candidates": len(report["candidate_ids"]),
        "trigger_tokens": " ".join(trigger_tokens),
        "trigger_tokens_flagged": " ".join(t for t in trigger_tokens if t in report["flagged_tokens"]),
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


def _fill_floors_and_overheads(records: list[dict]) -> None:
    """ASR floor = the clean run's ASR on the same triggered rows; overhead = wall time over the plain run on the
    same training data (the undefended run, or the clean run for BTU trained on clean data)."""
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


def _variant_name(config: BTUConfig) -> str:
    """``default``, or the options that differ from ``BTUConfig()`` (e.g. ``isolated_rows=mask``)."""
    default = BTUConfig()
    changed = [
        f"{name}={getattr(config, name)}"
        for name in ("flip_threshold", "reset_to", "isolated_rows")
        if getattr(config, name) != getattr(default, name)
    ]
    return ",".join(changed) or "default"


def _trigger_tokens(attack, tokenizer) -> list[str]:
    if hasattr(attack, "triggers"):
        return [t for word in attack.triggers for t in tokenizer.tokenize(word)]
    if hasattr(attack, "trigger"):
        return tokenizer.tokenize(attack.trigger)
    return []


if __name__ == "__main__":
    main()
