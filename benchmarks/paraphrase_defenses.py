"""Paraphrase-trigger defenses (Z-defense, loss truncation, honeypot, DPoE) side by side on the same poisoned data, against the plain Trainer.

    python benchmarks/paraphrase_defenses.py --dataset sst2 --attack syntactic --runs clean,undefended,honeypot,dpoe
    python benchmarks/paraphrase_defenses.py --dataset sst2 --attack style --poison-rate 0.2 --runs undefended
    python benchmarks/paraphrase_defenses.py --dataset sst2 --attack badnet,addsent --runs btu+honeypot
    python benchmarks/paraphrase_defenses.py --attack syntactic --runs honeypot --honeypot '{"layer": 2}' --tag l2

Runs, per attack (``--runs``, comma-separated):

- ``clean``: the plain Trainer on the unpoisoned data, scored on every attack's triggered rows: the ASR floor.
- ``undefended``: the plain Trainer on the poisoned data.
- ``z_defense``, ``loss_truncation``, ``honeypot``, ``dpoe``: ``BackdoorSafeTrainer`` with that defense (its fields
  from ``--z-defense`` / ``--loss-truncation`` / ``--honeypot`` / ``--dpoe``).
- ``btu``: ``BackdoorSafeTrainer`` with BTU alone (its fields from ``--btu``), to tell a stack's cost apart.
- ``btu+z_defense``, ``btu+loss_truncation``, ``btu+honeypot``, ``btu+dpoe``: the stack ``[BTUConfig(), <defense>]``.
- ``clean+<any defended run>`` (e.g. ``clean+btu+dpoe``): that defense on the unpoisoned data, scored like ``clean``:
  what the defense costs a user whose data holds no backdoor (CACC, and wall time over the plain clean run).

Plain runs (clean, undefended) are cached under ``--cache-dir`` (keyed by everything that shapes them) with their
training wall time, so other cells reuse them for the floor and the overhead. Each record has the CACC, ASR, floor,
``asr_untriggered`` (``evaluate_backdoor``'s rate of the target label on the ASR rows without their trigger: a model
trained on (nearly) clean rows can sit above the floor only because it calls more of those rows the target anyway),
wall time, overhead (wall time over the undefended run on the same data), the AUROC of the defense's per-row signal
against the ``poisoned`` column, and the command; records are merged into ``benchmarks/results/
paraphrase_defenses.json`` (a record with the same dataset, attack, scored attack, defense, rate, epochs, seed and
tag is replaced). The recipe is the reference one (MiniLM, lr 1e-4, batch 32, max length 128, 6% warm-up, weight
decay 0.01). ``os.getloadavg`` is recorded at the start and end of each run: wall times on a shared machine are only
comparable between runs with similar load.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: benchmarks/common, not installed
from benchmarks.common.records import device_name  # noqa: E402
from hf_backdoor import BackdoorSafeTrainer, default_text_model, load_task, make_asr_dataset, poison_dataset
from hf_backdoor.attacks import get_attack_config
from hf_backdoor.data import add_row_index, get_task_spec
from hf_backdoor.defenses.btu import BTUConfig
from hf_backdoor.defenses.dpoe import DPoEConfig
from hf_backdoor.defenses.honeypot import HoneypotConfig
from hf_backdoor.defenses.loss_truncation import LossTruncationConfig
from hf_backdoor.defenses.z_defense import ZDefenseConfig
from hf_backdoor.metrics import evaluate_backdoor
from hf_backdoor.models import load_text_classifier, load_text_tokenizer, model_display_name, tokenize_dataset

RESULTS = Path(__file__).resolve().parent / "results"
DEFENSES = {
    "z_defense": ZDefenseConfig,
    "loss_truncation": LossTruncationConfig,
    "honeypot": HoneypotConfig,
    "dpoe": DPoEConfig,
}
DEFENDED = ("btu", *DEFENSES, *(f"btu+{name}" for name in DEFENSES))
RUNS = ("clean", "undefended", *DEFENDED, *(f"clean+{run}" for run in DEFENDED))
# The per-row signal each defense reports, and the report key of its AUROC against the `poisoned` column.
SIGNALS = {
    "loss_truncation": ("dropped", "dropped_auroc"),
    "honeypot": ("weight", "weight_auroc"),
    "dpoe": ("expert_confidence", "expert_confidence_auroc"),
    "z_defense": ("row_z_score", "row_score_auroc"),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="sst2", help="packaged task: sst2, hsol, agnews, ...")
    parser.add_argument("--attack", default="syntactic", help="comma-separated: syntactic, style, badnet, addsent")
    parser.add_argument("--poison-rate", type=float, default=0.1)
    parser.add_argument(
        "--attack-kwargs",
        default="{}",
        help='other fields of the attack configs as JSON, e.g. \'{"mode": "clean-label"}\' (records and cache keys carry it)',
    )
    parser.add_argument("--runs", default="clean,undefended,loss_truncation", help=f"comma-separated subset of {RUNS}")
    parser.add_argument("--z-defense", default="{}", help="ZDefenseConfig fields as JSON")
    parser.add_argument("--loss-truncation", default="{}", help="LossTruncationConfig fields as JSON")
    parser.add_argument("--honeypot", default="{}", help="HoneypotConfig fields as JSON")
    parser.add_argument("--dpoe", default="{}", help="DPoEConfig fields as JSON")
    parser.add_argument("--btu", default="{}", help="BTUConfig fields as JSON (the btu run and the btu+ stacks)")
    parser.add_argument("--tag", default="default", help="names the defense settings in the records")
    parser.add_argument("--model", default=None, help="Hub id or local path (default: the packaged MiniLM-L6)")
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument(
        "--max-eval-samples", type=int, default=None, help="seeded slice of the test split (default: all of it)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--cache-dir", default="/tmp/para_models", help="where plain runs are kept for reuse")
    parser.add_argument(
        "--retrain-plain",
        action="store_true",
        help="train the plain runs again (and replace their cache), so every overhead is measured in this one run",
    )
    parser.add_argument("--output-dir", default="/tmp/para_runs")
    parser.add_argument("--output", default=str(RESULTS / "paraphrase_defenses.json"))
    parser.add_argument("--no-save", action="store_true", help="print the table without writing records")
    parser.add_argument(
        "--reports-dir",
        default=None,
        help="also write each defended run's full defense report (flagged tokens, flip rates, per-epoch signals) here",
    )
    return parser.parse_args(argv)


def _attack(name: str, dataset: str, rate: float, seed: int, extra: dict | None = None):
    kwargs = dict(poison_rate=rate, target_label=get_task_spec(dataset).default_target_label, seed=seed)
    if name in ("syntactic", "style"):
        kwargs["paraphrases"] = dataset  # the attack authors' released paraphrases, packaged
    try:
        return get_attack_config(name, **{**kwargs, **(extra or {})})
    except TypeError as error:  # a field the attack's config does not have
        raise SystemExit(f"--attack-kwargs {extra}: {error}") from None


def _attack_kwargs(args) -> dict:
    """--attack-kwargs parsed; an empty dict by default (the dirty-label attacks of every earlier record)."""
    extra = json.loads(args.attack_kwargs)
    if not isinstance(extra, dict):
        raise SystemExit(f"--attack-kwargs must be a JSON object, got {args.attack_kwargs!r}")
    return extra


def _training_args(args, output_dir: Path, cls=TrainingArguments) -> TrainingArguments:
    return cls(
        output_dir=str(output_dir),
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=128,
        warmup_steps=0.06,
        weight_decay=0.01,
        seed=args.seed,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=50,
        report_to="none",
        disable_tqdm=True,
    )


def _train(args, model_name, label_names, train_rows, output_dir: Path, defense=None):
    """(trainer, wall seconds, load averages) of one fine-tuning run on raw text rows."""
    set_seed(args.seed)
    model, tokenizer = load_text_classifier(model_name, label_names)
    kwargs = dict(
        model=model,
        args=_training_args(args, output_dir),
        train_dataset=tokenize_dataset(train_rows, tokenizer, args.max_length),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    trainer = BackdoorSafeTrainer(defense=defense, **kwargs) if defense is not None else Trainer(**kwargs)
    load_start = os.getloadavg()[0]
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start, (load_start, os.getloadavg()[0])


def _rows_digest(rows) -> str:
    """A digest of the training rows themselves, so a changed packaged file never reuses a model trained on the old."""
    digest = hashlib.sha1()
    for text, label in zip(rows["text"], rows["label"]):
        digest.update(f"{text}\t{label}\n".encode())
    return digest.hexdigest()[:12]


def _cache_key(args, model_name: str, attack, train_rows) -> str:
    shape = {
        "rows": _rows_digest(train_rows),
        "dataset": args.dataset,
        "attack": None if attack is None else {"name": attack.name, "rate": attack.poison_rate, "seed": attack.seed},
        # only when given, so the dirty-label models cached before the option are still found
        **({"attack_kwargs": extra} if attack is not None and (extra := _attack_kwargs(args)) else {}),
        "model": model_display_name(model_name),
        "epochs": args.epochs,
        "lr": args.lr,
        "batch": args.batch_size,
        "max_length": args.max_length,
        "max_train": args.max_train_samples,
        "seed": args.seed,
    }
    digest = hashlib.sha1(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:10]
    name = "clean" if attack is None else f"{attack.name}{attack.poison_rate}"
    return f"{args.dataset}_{name}_e{args.epochs:g}_s{args.seed}_{digest}"


def _plain_is_cached(args, model_name, attack, train_rows) -> bool:
    return (
        not args.retrain_plain
        and (Path(args.cache_dir) / _cache_key(args, model_name, attack, train_rows) / "run_info.json").exists()
    )


def _plain(args, model_name, label_names, train_rows, attack):
    """A plain Trainer run, trained once and kept under --cache-dir (model + its wall time)."""
    run_dir = Path(args.cache_dir) / _cache_key(args, model_name, attack, train_rows)
    info = run_dir / "run_info.json"
    if info.exists() and not args.retrain_plain:
        model, tokenizer = load_text_classifier(str(run_dir), label_names)
        trainer = Trainer(
            model=model,
            args=TrainingArguments(output_dir=str(run_dir / "eval"), per_device_eval_batch_size=128, report_to="none"),
            processing_class=tokenizer,
        )
        saved = json.loads(info.read_text())
        return trainer, saved["wall_s"], tuple(saved.get("load", (None, None))), True
    trainer, wall, load = _train(args, model_name, label_names, train_rows, Path(args.output_dir) / run_dir.name)
    trainer.save_model(str(run_dir))
    info.write_text(json.dumps({"wall_s": wall, "load": load, "epochs": args.epochs}))
    return trainer, wall, load, False


def _defense(args, run: str, configs: dict):
    """The defense of a defended run name: BTU alone, one config, or the stack [BTU, config] for ``btu+<name>``."""
    name = run.split("+")[-1]
    if name == "btu" or run.startswith("btu+"):
        btu = BTUConfig(**{"seed": args.seed, **json.loads(args.btu)})
        return btu if name == "btu" else [btu, configs[name]]
    return configs[name]


def _save_report(args, trainer, name: str) -> None:
    if args.reports_dir and trainer.defense_report:
        # a clean-label run's report must not replace the dirty-label one of the same attack, rate, seed and tag
        extra = "".join(f"_{key}-{value}" for key, value in sorted(_attack_kwargs(args).items()))
        path = Path(args.reports_dir) / f"{name}{extra}_s{args.seed}_{args.tag}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(trainer.defense_report, indent=1, default=str) + "\n")


def _defense_fields(report: dict | None, name: str) -> dict:
    """The per-row signal's AUROC (last epoch and by epoch) and its means over poisoned and clean rows."""
    if not report:
        return {}
    reports = report.get("defenses", [report])
    own = next((r for r in reports if r.get("defense") == name), None)
    if own is None:
        return {}
    fields = {
        "defense_time_s": sum((own.get("timings_s") or {}).values()),
        "defense_config": own.get("config"),
    }
    if name in SIGNALS:  # BTU flags tokens, not rows: its record has the flagged tokens instead
        signal, key = SIGNALS[name]
        by_epoch = own.get("signals", {}).get(signal, {})
        fields.update(
            {
                "signal": signal,
                "signal_auroc": own.get(key),
                "signal_auroc_by_epoch": {e: v.get("auroc") for e, v in by_epoch.items()},
                "signal_mean_poisoned": (by_epoch[max(by_epoch)] if by_epoch else {}).get("mean_poisoned"),
                "signal_mean_clean": (by_epoch[max(by_epoch)] if by_epoch else {}).get("mean_clean"),
            }
        )
    if name == "z_defense":
        fields.update(
            {
                "z_flagged": " ".join(f"{p['token']}->{p['label']}" for p in own.get("flagged_pairs") or []),
                "z_features": own.get("features_used"),
                "z_lexical_share": own.get("lexical_share"),
                "z_flagged_rows": own.get("flagged_rows"),
                "z_precision": own.get("flagged_precision"),
                "z_recall": own.get("flagged_recall"),
                "z_left_out": own.get("left_out_rows"),
                "z_left_out_precision": own.get("left_out_precision"),
                "z_treated_recall": own.get("treated_recall"),
            }
        )
    btu = next((r for r in reports if r.get("defense") == "btu"), None)
    if btu is not None:
        fields["btu_flagged_tokens"] = " ".join(btu.get("flagged_tokens", []))
        fields["btu_spared_tokens"] = " ".join(btu.get("spared_tokens", []))
        fields["btu_isolated_rows"] = btu.get("num_isolated_rows")
        # Each judged candidate's task-word test: [neighbour ratio, pretrained-probe shift, spared].
        fields["btu_task_word_scores"] = {
            token: [score["neighbour_ratio"], score["prior_shift"], score["spared"]]
            for token, score in (btu.get("task_word_scores") or {}).items()
        }
        # Each candidate the mislabel test judged: [the probe's mean probability of its rows' label, the same on the
        # label's other rows, p-value, flagged].
        fields["btu_mislabel_flagged"] = " ".join(
            t for t, reason in (btu.get("flagged_by") or {}).items() if reason == "mislabel_test"
        )
        fields["btu_mislabel_scores"] = {
            token: [
                score["label_prob"],
                score["label_prob_elsewhere"],
                float(f"{score['p_value']:.3g}"),
                score["flagged"],
            ]
            for token, score in (btu.get("mislabel_scores") or {}).items()
        }
    return fields


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or set(runs) - set(RUNS):
        raise SystemExit(f"--runs must list some of {RUNS}, got {args.runs!r}")
    model_name = args.model or default_text_model()
    task = load_task(args.dataset)
    train_split = task["train"]
    if args.max_train_samples:
        train_split = train_split.shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(train_split))))
    label_names = train_split.features["label"].names
    extra = _attack_kwargs(args)
    attacks = [_attack(a.strip(), args.dataset, args.poison_rate, args.seed, extra) for a in args.attack.split(",")]
    tokenizer = load_text_tokenizer(model_name)
    test_split = task["test"]
    if args.max_eval_samples:
        test_split = test_split.shuffle(seed=args.seed).select(range(min(args.max_eval_samples, len(test_split))))
    # Row ids on the test rows, kept by make_asr_dataset, so that evaluate_backdoor finds each ASR row's clean row
    # (asr_untriggered).
    test_split = add_row_index(test_split)
    test_set = tokenize_dataset(test_split, tokenizer, args.max_length)
    asr_sets = {a.name: tokenize_dataset(make_asr_dataset(test_split, a), tokenizer, args.max_length) for a in attacks}
    poisoned = {a.name: poison_dataset(train_split, a, tokenizer=tokenizer) for a in attacks}
    configs = {
        "loss_truncation": LossTruncationConfig(**json.loads(args.loss_truncation)),
        "honeypot": HoneypotConfig(**json.loads(args.honeypot)),
        "dpoe": DPoEConfig(**json.loads(args.dpoe)),
        "z_defense": ZDefenseConfig(**json.loads(args.z_defense)),
    }
    command = "python " + shlex.join(["benchmarks/paraphrase_defenses.py", *(sys.argv[1:] if argv is None else argv)])
    common = dict(
        dataset=args.dataset,
        model=model_display_name(model_name),
        device=device_name(),
        seed=args.seed,
        epochs=args.epochs,
        learning_rate=args.lr,
        num_train=len(train_split),
        # Only a sliced test split is recorded (and keys the record): full-split records keep their old keys.
        **({"num_test": len(test_split)} if args.max_eval_samples else {}),
        command=command,
    )
    records: list[dict] = []
    floors: dict[str, float] = {}
    # The floor, always: a clean model's ASR on the same triggered rows (trained once, then read from the cache).
    if True:
        trainer, wall, load, cached = _plain(args, model_name, label_names, train_split, None)
        for attack in attacks:
            evaluation = evaluate_backdoor(trainer, test_set, asr_sets[attack.name], attack.target_label)
            floors[attack.name] = evaluation.asr
            if "clean" in runs:
                records.append(
                    {
                        **common,
                        "attack": "none",
                        "asr_attack": attack.name,
                        "defense": "none",
                        "tag": "plain",
                        "poison_rate": 0.0,
                        "cacc": evaluation.cacc,
                        "asr_untriggered": evaluation.asr_untriggered,
                        "asr": evaluation.asr,
                        "asr_floor": evaluation.asr,
                        "wall_s": round(wall, 1),
                        "overhead": 1.0,
                        "load": load,
                        "cached": cached,
                    }
                )
        # Defenses on the unpoisoned data: trained once, scored on every attack's triggered rows.
        for run in (r for r in runs if r.startswith("clean+")):
            defended = run.removeprefix("clean+")
            out = Path(args.output_dir) / f"{args.dataset}_clean_{defended}_{args.tag}"
            defended_trainer, defended_wall, defended_load = _train(
                args, model_name, label_names, train_split, out, defense=_defense(args, defended, configs)
            )
            _save_report(args, defended_trainer, f"{args.dataset}_clean_{defended}")
            for attack in attacks:
                evaluation = evaluate_backdoor(defended_trainer, test_set, asr_sets[attack.name], attack.target_label)
                records.append(
                    {
                        **common,
                        "attack": "none",
                        "asr_attack": attack.name,
                        "defense": defended,
                        "tag": args.tag,
                        "poison_rate": 0.0,
                        "cacc": evaluation.cacc,
                        "asr_untriggered": evaluation.asr_untriggered,
                        "asr": evaluation.asr,
                        "asr_floor": floors[attack.name],
                        "wall_s": round(defended_wall, 1),
                        "overhead": round(defended_wall / wall, 3),
                        "plain_cached": cached,
                        "load": defended_load,
                        "cached": False,
                        **_defense_fields(defended_trainer.defense_report, defended.split("+")[-1]),
                    }
                )
    for attack in attacks:
        train_rows = poisoned[attack.name]
        base = {
            **common,
            "attack": attack.name,
            "asr_attack": attack.name,
            "poison_rate": attack.poison_rate,
            "num_poisoned": int(np.sum(train_rows["poisoned"])),
            **({"attack_kwargs": json.dumps(extra, sort_keys=True)} if extra else {}),
            "asr_floor": floors[attack.name],
        }
        plain_wall = None
        if "undefended" in runs or _plain_is_cached(args, model_name, attack, train_rows):
            plain, plain_wall, plain_load, cached = _plain(args, model_name, label_names, train_rows, attack)
            if "undefended" in runs:
                evaluation = evaluate_backdoor(plain, test_set, asr_sets[attack.name], attack.target_label)
                records.append(
                    {
                        **base,
                        "defense": "none",
                        "tag": "plain",
                        "cacc": evaluation.cacc,
                        "asr_untriggered": evaluation.asr_untriggered,
                        "asr": evaluation.asr,
                        "wall_s": round(plain_wall, 1),
                        "overhead": 1.0,
                        "load": plain_load,
                        "cached": cached,
                    }
                )
        for run in runs:
            if run in ("clean", "undefended") or run.startswith("clean+"):
                continue
            name = run.split("+")[-1]
            defense = _defense(args, run, configs)
            out = Path(args.output_dir) / f"{args.dataset}_{attack.name}_{run}_{args.tag}"
            trainer, wall, load = _train(args, model_name, label_names, train_rows, out, defense=defense)
            _save_report(args, trainer, f"{args.dataset}_{attack.name}{attack.poison_rate:g}_{run}")
            evaluation = evaluate_backdoor(trainer, test_set, asr_sets[attack.name], attack.target_label)
            records.append(
                {
                    **base,
                    "defense": run,
                    "tag": args.tag,
                    "cacc": evaluation.cacc,
                    "asr_untriggered": evaluation.asr_untriggered,
                    "asr": evaluation.asr,
                    "wall_s": round(wall, 1),
                    "overhead": None if plain_wall is None else round(wall / plain_wall, 3),
                    "load": load,
                    "cached": False,
                    **_defense_fields(trainer.defense_report, name),
                }
            )
    print(
        f"\n{args.dataset} / rate {args.poison_rate} / {args.epochs:g} epochs / seed {args.seed} / tag {args.tag}"
        + (f" / attack {json.dumps(extra, sort_keys=True)}" if extra else "")
    )
    print(
        f"{'attack':<10}{'defense':<14}{'CACC':>7}{'ASR':>7}{'floor':>7}{'untrig':>7}{'wall s':>8}{'overhd':>7}"
        f"{'AUROC':>7}  load"
    )
    for r in records:
        auroc = r.get("signal_auroc")
        print(
            f"{r['asr_attack'] if r['attack'] == 'none' else r['attack']:<10}{r['defense']:<14}{r['cacc']:>7.3f}"
            f"{r['asr']:>7.3f}{r['asr_floor']:>7.3f}{_fmt(r.get('asr_untriggered')):>7}{r['wall_s']:>8.0f}"
            f"{'-' if r['overhead'] is None else format(r['overhead'], '.2f'):>7}"
            f"{'-' if auroc is None else format(auroc, '.3f'):>7}  {r['load']}"
        )
    if not args.no_save:
        _merge(Path(args.output), records)
        print(f"wrote {args.output}")
    return records


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _key(r: dict) -> tuple:
    return (
        r["dataset"],
        r["attack"],
        r["asr_attack"],
        r["defense"],
        r["tag"],
        r["poison_rate"],
        r["epochs"],
        r.get("learning_rate"),
        r.get("num_train"),
        r.get("num_test"),
        r.get("attack_kwargs"),
        r["seed"],
    )


def _merge(output: Path, new: list[dict]) -> None:
    existing = json.loads(output.read_text()) if output.exists() else []
    replaced = {_key(r) for r in new}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps([r for r in existing if _key(r) not in replaced] + new, indent=1) + "\n")


if __name__ == "__main__":
    main()
