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
    load_text_classifier,
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
from hf_backdoor.metrics import detection_metrics
from hf_backdoor.models import model_display_name

RUNS = ("clean", "undefended", "btu")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="sst2", help=f"packaged task ({', '.join(TASKS)}), Hub id or local path")
    parser.add_argument("--attack", default="badnet", choices=sorted(ATTACKS))
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
    model_name = args.model or default_text_model()
    task = load_experiment_task(args.dataset, args.max_train_samples, args.max_eval_samples, args.seed)
    label_names = task["train"].features["label"].names
    attack = attack_for_task(
        args.attack,
        args.dataset,
        poison_rate=args.poison_rate,
        target_label=args.target_label,
        seed=args.seed,
        triggers=args.triggers,
    )
    target = attack.target_label
    _, tokenizer = load_text_classifier(model_name, label_names)
    poisoned = poison_dataset(task["train"], attack, tokenizer=tokenizer)
    test_set = tokenize_dataset(task["test"], tokenizer, args.max_length)
    asr_set = tokenize_dataset(make_asr_dataset(task["test"], attack), tokenizer, args.max_length)
    defense = (
        BTUConfig.paper(seed=args.seed)
        if args.paper
        else BTUConfig(flip_threshold=args.flip_threshold, reset_to=args.reset_to, seed=args.seed)
    )
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
    results, records = {}, []
    for run in runs:
        is_clean = run == "clean" or args.clean_data
        train = task["train"] if is_clean else poisoned
        result = fine_tune_and_evaluate(
            settings,
            label_names,
            train,
            test_set,
            asr_set,
            Path(args.output_dir) / run,
            defense=defense if run == "btu" else None,
            target_label=target,
        )
        results[run] = result
        record = {
            "dataset": args.dataset,
            "attack": "none" if is_clean else attack.name,
            "defense": "btu" if run == "btu" else "none",
            "model": model_display_name(model_name),
            "poison_rate": 0.0 if is_clean else attack.poison_rate,
            "cacc": result.evaluation.cacc,
            "asr": result.evaluation.asr,
            "asr_floor": None,
            "wall_s": round(result.wall_s, 2),
            "overhead": None,
            "device": device_name(),
            "seed": args.seed,
            "command": command,
            "asr_attack": attack.name,
            "target_label": target,
            "epochs": args.epochs,
            "learning_rate": args.lr,
            "train_samples_per_s": round(result.train_samples_per_s, 1),
        }
        if run == "btu":
            report = result.trainer.defense_report
            trigger_tokens = _trigger_tokens(attack, tokenizer)
            record.update(
                {
                    "btu_variant": "paper"
                    if args.paper
                    else ("default" if args.reset_to == "padding" else "reset_to_pretrained"),
                    "flagged_tokens": " ".join(report["flagged_tokens"]),
                    "num_flagged": len(report["flagged_ids"]),
                    "num_candidates": len(report["candidate_ids"]),
                    "trigger_tokens": " ".join(trigger_tokens),
                    "trigger_tokens_flagged": " ".join(t for t in trigger_tokens if t in report["flagged_tokens"]),
                    "num_isolated_rows": report["num_isolated_rows"],
                    **{f"{k}": v for k, v in report["timings_s"].items()},
                }
            )
            if report.get("isolated_row_indices") is not None and not is_clean:
                flags = np.zeros(len(train), dtype=int)
                flags[report["isolated_row_indices"]] = 1
                det = detection_metrics(flags, train["poisoned"])
                record.update({"isolation_precision": det["precision"], "isolation_recall": det["recall"]})
        records.append(record)
    for record in records:
        if "clean" in results:
            record["asr_floor"] = results["clean"].evaluation.asr
        if "undefended" in results and record["defense"] == "btu":
            record["overhead"] = round(record["wall_s"] / results["undefended"].wall_s, 3)
        elif record["defense"] == "none":
            record["overhead"] = 1.0

    if results[runs[-1]].trainer.is_world_process_zero():
        print(
            f"\n{args.dataset} / {attack.name} rate {attack.poison_rate} target {target} / "
            f"{model_display_name(model_name)} / BTU {'paper' if args.paper else 'default'}"
        )
        print(f"{'run':<12}{'CACC':>8}{'ASR':>8}{'floor':>8}{'wall s':>9}{'overhead':>10}")
        for run, record in zip(runs, records):
            floor = "-" if record["asr_floor"] is None else f"{record['asr_floor']:.3f}"
            overhead = "-" if record["overhead"] is None else f"{record['overhead']:.2f}x"
            print(
                f"{run:<12}{record['cacc']:>8.3f}{record['asr']:>8.3f}{floor:>8}{record['wall_s']:>9.1f}{overhead:>10}"
            )
        if "btu" in results:
            report = results["btu"].trainer.defense_report
            print(
                f"flagged: {report['flagged_tokens']} (of {len(report['candidate_ids'])} candidates); "
                f"isolated rows: {report['num_isolated_rows']}"
            )
            print("phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in report["timings_s"].items()))
        if args.results_json:
            Path(args.results_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.results_json).write_text(json.dumps(records, indent=1) + "\n")
    return records


def _trigger_tokens(attack, tokenizer) -> list[str]:
    if hasattr(attack, "triggers"):
        return [t for word in attack.triggers for t in tokenizer.tokenize(word)]
    if hasattr(attack, "trigger"):
        return tokenizer.tokenize(attack.trigger)
    return []


if __name__ == "__main__":
    main()
