"""Baseline: fine-tune a text classifier with the plain ``transformers.Trainer`` on clean and poisoned data.

Runs twice on the same data and seed, once clean and once poisoned, and reports clean accuracy (CACC) and attack
success rate (ASR) beside its floor (the clean model's ASR on the same triggered rows).

    python recipes/sst2_baseline.py                       # SST-2, BadNet 10%, target 1, offline default model
    accelerate launch recipes/sst2_baseline.py --dataset hsol --attack addsent
    python recipes/sst2_baseline.py --model bert-base-uncased --lr 2e-5 --dataset stanfordnlp/sst2
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from hf_backdoor import (
    ATTACKS,
    default_text_model,
    load_text_tokenizer,
    make_asr_dataset,
    poison_dataset,
    tokenize_dataset,
)
from hf_backdoor.data import TASKS
from hf_backdoor.experiments import (
    TextRunSettings,
    attack_for_task,
    device_name,
    fine_tune_and_evaluate,
    load_experiment_task,
)
from hf_backdoor.models import model_display_name


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="sst2", help=f"packaged task ({', '.join(TASKS)}), Hub id or local path")
    parser.add_argument("--attack", default="badnet", choices=sorted(ATTACKS))
    parser.add_argument("--poison-rate", type=float, default=0.1)
    parser.add_argument(
        "--triggers", default=None, help="BadNet trigger words, comma-separated (default: cf,mn,bb,tq,mb)"
    )
    parser.add_argument("--target-label", type=int, default=None, help="default: the task's usual target")
    parser.add_argument("--mode", default="dirty", choices=["dirty", "clean-label", "mix"])
    parser.add_argument("--model", default=None, help="Hub id or local path (default: the packaged MiniLM-L6)")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument(
        "--lr",
        type=float,
        default=1e-4,
        help="MiniLM was trained as a sentence encoder and needs a higher rate than BERT recipes' 2e-5",
    )
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--runs", default="clean,poisoned", help="comma-separated subset of clean,poisoned")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--output-dir", default="runs/baseline")
    parser.add_argument("--results-json", default=None, help="write the records here (a JSON list)")
    return parser.parse_args(argv)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or set(runs) - {"clean", "poisoned"}:
        raise SystemExit(f"--runs must list clean and/or poisoned, got {args.runs!r}")
    model_name = args.model or default_text_model()
    task = load_experiment_task(args.dataset, args.max_train_samples, args.max_eval_samples, args.seed)
    label_names = task["train"].features["label"].names
    config = attack_for_task(
        args.attack,
        args.dataset,
        poison_rate=args.poison_rate,
        target_label=args.target_label,
        mode=args.mode,
        seed=args.seed,
        triggers=args.triggers,
    )
    tokenizer = load_text_tokenizer(model_name)
    train_sets = {"clean": task["train"], "poisoned": poison_dataset(task["train"], config, tokenizer=tokenizer)}
    asr_set = tokenize_dataset(make_asr_dataset(task["test"], config), tokenizer, args.max_length)
    test_set = tokenize_dataset(task["test"], tokenizer, args.max_length)

    settings = TextRunSettings(
        model_name=model_name,
        learning_rate=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        bf16=args.bf16,
    )
    results, records = {}, []
    for run in runs:
        result = fine_tune_and_evaluate(
            settings,
            label_names,
            train_sets[run],
            test_set,
            asr_set,
            Path(args.output_dir) / run,
            target_label=config.target_label,
        )
        results[run] = result.evaluation
        records.append(
            {
                "dataset": args.dataset,
                "attack": "none" if run == "clean" else config.name,
                "defense": "none",
                "model": model_display_name(model_name),
                "poison_rate": 0.0 if run == "clean" else config.poison_rate,
                "cacc": result.evaluation.cacc,
                "asr": result.evaluation.asr,
                "asr_floor": None,
                "wall_s": round(result.wall_s, 2),
                "overhead": 1.0,
                "device": device_name(),
                "seed": args.seed,
                "command": "python "
                + shlex.join(["recipes/sst2_baseline.py", *(sys.argv[1:] if argv is None else argv)]),
                "asr_attack": config.name,
                "mode": config.mode,
                "target_label": config.target_label,
                "train_samples": len(train_sets[run]),
                "epochs": args.epochs,
                "learning_rate": args.lr,
                "batch_size": args.batch_size,
                "train_samples_per_s": round(result.train_samples_per_s, 1),
            }
        )
    if "clean" in results:  # the floor: the clean model's ASR on the same triggered rows
        for record in records:
            record["asr_floor"] = results["clean"].asr

    if result.trainer.is_world_process_zero():
        print(
            f"\n{args.dataset} / {config.name} {config.mode} rate {config.poison_rate} target {config.target_label} "
            f"/ {model_display_name(model_name)}"
        )
        print(f"{'run':<10}{'CACC':>8}{'ASR':>8}{'floor':>8}{'wall s':>9}")
        for record, run in zip(records, runs):
            floor = "-" if record["asr_floor"] is None else f"{record['asr_floor']:.3f}"
            print(f"{run:<10}{record['cacc']:>8.3f}{record['asr']:>8.3f}{floor:>8}{record['wall_s']:>9.1f}")
        if args.results_json:
            Path(args.results_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.results_json).write_text(json.dumps(records, indent=1) + "\n")
    return records


if __name__ == "__main__":
    main()
