"""ABL and CUL (EBYD exposure) on SST-2 with the default text model (the reference training: lr 1e-4, 3 epochs,
batch 32).

    python benchmarks/text_defenses.py                                   # BadNet, Syntactic and Style, every run
    python benchmarks/text_defenses.py --attacks syntactic --runs undefended,abl,cul,cul_filter --abl-ratio 0.1
    python benchmarks/text_defenses.py --attacks badnet --runs cul --detection-seeds 3 --models-dir M
    python benchmarks/text_defenses.py --max-train-samples 300 --epochs 1 --output /tmp/smoke.json   # smoke run

Per attack: the clean model (its ASR on the triggered rows is the floor), the undefended model, ABL
(``BackdoorSafeTrainer`` + ``ABLConfig``, isolation after one LGA epoch), CUL exposure of the undefended model on 69
stratified validation rows (1% of train: detected label, score, row AUROC of the exposed margins), and ``cul_filter``:
retrain without the training rows that carry the detected label and the highest exposed margins (``--cul-filter-ratio``
of the training set). With ``--detection-seeds N`` the ``cul`` run also exposes N clean models (seeds 0..N-1, each on
its own stratified slice) and scores model detection: the threshold from the clean models only, the AUROC over every
model it exposed. ``--models-dir`` keeps the plain (clean, undefended) models and reloads them, with their training
time, in later runs.

``overhead`` is wall time over the plain training on the same data (ABL: the defended run over the plain run; CUL: the
exposure over the training of the model it exposes; CUL filter: exposure, scoring and retraining over the plain run);
``overhead_epochs`` is a defense's extra wall time in epochs of plain training. Records (``section`` ``text``) are
merged into ``--output`` as each run finishes: by default ``benchmarks/results/vision_defenses.json``, where the text
runs have been recorded since this section was part of ``vision_defenses.py``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: benchmarks/common, not installed
from benchmarks.common import records, runs  # noqa: E402

RUNS = ("clean", "undefended", "abl", "cul", "cul_filter")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--attacks", default="badnet,syntactic,style", help="comma-separated text attacks")
    parser.add_argument("--runs", default=",".join(RUNS), help=f"runs per attack, some of {','.join(RUNS)}; "
                        "without clean, the floor comes from a clean model in benchmarks/results/")  # fmt: skip
    parser.add_argument("--model", default=None, help="Hub id or local path (default: the packaged MiniLM-L6)")
    parser.add_argument("--epochs", type=float, default=3.0, help="training epochs")
    parser.add_argument("--max-train-samples", type=int, default=None, help="seeded slice of the training split")
    parser.add_argument("--max-eval-samples", type=int, default=None, help="seeded slice of the test split")
    parser.add_argument("--poison-rate", type=float, default=0.1, help="share of the training rows poisoned")
    parser.add_argument("--models-dir", default=None, help="keep the plain models here and reuse them (default: not)")
    parser.add_argument(
        "--detection-seeds", type=int, default=0, help="with cul: expose this many clean models for model detection"
    )
    parser.add_argument("--abl-ratio", type=float, default=0.01, help="ABL's isolation ratio")
    runs.add_abl_arguments(
        parser, objective_help="ABL's unlearning (default: ABL's, the isolated rows' ascent)", guard_drop=True
    )
    parser.add_argument(
        "--cul-method", default="cul", choices=["cul", "random_label", "rnp_unlearning"], help="exposure method"
    )
    parser.add_argument("--cul-lr", type=float, default=None, help="exposure learning rate (default: the official)")
    parser.add_argument("--cul-filter-ratio", type=float, default=0.15, help="share of training rows cul_filter drops")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--output", default=str(records.RESULTS / "vision_defenses.json"))
    return parser.parse_args(argv)


def text_abl_config(args):
    """ABL on the text model: isolation after one LGA epoch (the reference found later isolation picks clean rows),
    ``--abl-ratio`` isolated, and the unlearning flags (unset: ABL's defaults)."""
    from hf_backdoor.defenses import ABLConfig

    return ABLConfig(
        isolation_epochs=1,
        isolation_ratio=args.abl_ratio,
        lga=args.abl_lga,
        seed=args.seed,
        **runs.abl_unlearning_fields(args),
    )


def _models_dir(args, model_name: str) -> Path | None:
    """Where the plain models of this setting are kept (``--models-dir``): one folder per model, data size, epochs
    and poison rate, so a cached model is only reused for the same training."""
    if not args.models_dir:
        return None
    from hf_backdoor.models import model_display_name

    setting = f"{model_display_name(model_name).replace('/', '_')}_e{args.epochs:g}_r{args.poison_rate:g}"
    setting += f"_n{args.max_train_samples}" if args.max_train_samples else ""
    return Path(args.models_dir) / setting


def run(args, command: str, out: Path, emit) -> None:
    from hf_backdoor import default_text_model, make_asr_dataset, poison_dataset, tokenize_dataset
    from hf_backdoor.data import attack_for_task, load_task
    from hf_backdoor.defenses import ExposeConfig, detection_threshold, expose_model
    from hf_backdoor.metrics import detection_metrics, roc_auc
    from hf_backdoor.models import load_text_tokenizer, model_display_name

    model_name = args.model or default_text_model()
    training_args = runs.text_training_args(out, num_train_epochs=args.epochs, seed=args.seed, bf16=args.bf16)
    task = runs.limit_splits(load_task("sst2"), args.max_train_samples, args.max_eval_samples, args.seed)
    label_names = task["train"].features["label"].names
    tokenizer = load_text_tokenizer(model_name)
    test_set = tokenize_dataset(task["test"], tokenizer)
    attacks = [attack_for_task(a, "sst2", poison_rate=args.poison_rate, seed=args.seed) for a in _split(args.attacks)]
    asr_sets = {a.name: tokenize_dataset(make_asr_dataset(task["test"], a), tokenizer) for a in attacks}
    models_dir = _models_dir(args, model_name)

    def plain_run(train_rows, attack_name: str, seed: int, kind: str, asr_attack: str):
        run_dir = models_dir / f"{attack_name}_seed{seed}" / kind if models_dir else None
        seeded = dataclasses.replace(training_args, seed=seed)
        return runs.fine_tune_and_evaluate(
            seeded, model_name, label_names, train_rows, test_set, asr_sets[asr_attack], run_dir=run_dir
        )

    def expose(trainer, seed: int):
        # 69 stratified validation rows: 1% of the training set, as EBYD's defense data
        clean_dev = runs.stratified_clean_slice(task["validation"], 69 / len(task["validation"]), seed)
        return expose_model(
            trainer, clean_dev, ExposeConfig(method=args.cul_method, learning_rate=args.cul_lr, seed=seed)
        )

    def record(attack, defense, evaluation, wall, floor, extra=None):
        return {
            "section": "text",
            "dataset": "sst2",
            "attack": attack,
            "defense": defense,
            "model": model_display_name(model_name),
            "poison_rate": 0.0 if attack == "none" else args.poison_rate,
            "cacc": evaluation.cacc if evaluation else None,
            "asr": evaluation.asr if evaluation else None,
            "asr_floor": floor,
            "wall_s": round(wall, 2),
            "overhead": extra.pop("overhead", None) if extra else None,
            "device": records.device_name(),
            "seed": args.seed,
            "command": command,
            **(extra or {}),
        }

    def exposure_fields(exposure, plain_wall: float) -> dict:
        return {
            "overhead": round(exposure.wall_s / plain_wall, 3),
            "overhead_epochs": round(exposure.wall_s / (plain_wall / args.epochs), 2),
            "cul_label": exposure.backdoor_label,
            "cul_score": exposure.score,
            "cul_shares": json.dumps([round(s, 3) for s in exposure.label_shares]),
            "cul_exposed": exposure.exposed,
            "cul_clean_acc_before": exposure.clean_accuracy_before,
            "cul_clean_acc_after": exposure.clean_accuracy_after,
            "cul_learning_rate": exposure.learning_rate,
            "cul_method": args.cul_method,
        }

    run_names = set(_split(args.runs))
    if not run_names or run_names - set(RUNS):
        raise SystemExit(f"--runs must list some of {RUNS}, got {args.runs!r}")
    if run_names & {"abl", "cul", "cul_filter"}:
        run_names.add("undefended")  # what ABL's overhead is measured against and what CUL exposes
    exposure_records = []
    if args.detection_seeds and run_names & {"cul", "cul_filter"}:
        # Clean models calibrate the model-detection threshold: seeds 0..N-1, each exposed on its own clean slice.
        for seed in range(args.detection_seeds):
            clean = plain_run(task["train"], "none", seed, "clean", attacks[0].name)
            exposure = expose(clean.trainer, seed)
            extra = {**exposure_fields(exposure, clean.wall_s), "seed": seed, "backdoored": False}
            extra.update(model_cacc=clean.evaluation.cacc)
            exposure_records.append(record("none", "cul", None, exposure.wall_s, None, extra))
            emit([exposure_records[-1]])
    for attack in attacks:
        floor = epoch_s = None
        if "clean" in run_names:
            clean = plain_run(task["train"], "none", args.seed, "clean", attack.name)
            floor, epoch_s = clean.evaluation.asr, clean.wall_s / args.epochs
            emit([record("none", "none", clean.evaluation, clean.wall_s, None, {"asr_attack": attack.name})])
        train = poison_dataset(task["train"], attack, tokenizer=tokenizer)
        truth = np.asarray(train["poisoned"], dtype=bool)
        plain = plain_run(train, attack.name, args.seed, "undefended", attack.name)
        epoch_s = epoch_s or plain.wall_s / args.epochs
        emit([record(attack.name, "none", plain.evaluation, plain.wall_s, floor, {"asr_attack": attack.name})])
        if "abl" in run_names:
            abl_config = text_abl_config(args)
            abl = runs.fine_tune_and_evaluate(
                training_args, model_name, label_names, train, test_set, asr_sets[attack.name], defense=abl_config,
                # the guard's clean rows: the validation split, never the test rows that CACC and ASR are read on
                eval_dataset=task["validation"] if abl_config.unlearning_guard_drop is not None else None,
            )  # fmt: skip
            report = abl.trainer.defense_report
            isolation, guard = report["isolation"], report["unlearning_guard"]  # guard: {} when off
            abl_extra = {
                "asr_attack": attack.name,
                "overhead": round(abl.wall_s / plain.wall_s, 3),
                "overhead_epochs": round((abl.wall_s - plain.wall_s) / epoch_s, 2),
                "abl_phases_epochs": round(sum(report["timings_s"].values()) / (abl.wall_s / args.epochs), 3),
                "abl_isolation_precision": isolation.get("precision"),
                "abl_isolation_recall": isolation.get("recall"),
                "abl_loss_auroc": isolation.get("loss_auroc"),
                "abl_precision_at_10pct": isolation.get("at_ratio", {}).get("0.1", {}).get("precision"),
                # the ascent: epochs run and the isolated rows' accuracy on their (poisoned) labels per epoch
                "abl_unlearning_accuracy": json.dumps([round(h["isolated_accuracy"], 3) for h in report["unlearning"]]),
                "abl_guard_undone_steps": len(guard["undone_steps"]) if guard else None,
                # the guard's held-out accuracy after each unlearning epoch (epoch 0: before unlearning)
                "abl_guard_accuracy": json.dumps([round(h["guard_accuracy"], 3) for h in report["unlearning"]])
                if guard
                else None,
                # part of the results key: ABL runs of other settings keep their own records
                "abl_config": json.dumps(dataclasses.asdict(abl_config)),
            }
            emit([record(attack.name, "abl", abl.evaluation, abl.wall_s, floor, abl_extra)])
        if not run_names & {"cul", "cul_filter"}:
            continue
        start = time.perf_counter()
        exposure = expose(plain.trainer, args.seed)
        margins = exposure.score_rows(train)
        cul_wall = time.perf_counter() - start
        labels = np.asarray(train["label"])
        candidates = labels == exposure.backdoor_label
        drop_count = int(args.cul_filter_ratio * len(train))
        ranked = np.flatnonzero(candidates)[np.argsort(-margins[candidates], kind="stable")][:drop_count]
        dropped = np.zeros(len(train), dtype=bool)
        dropped[ranked] = True
        cul_extra = {
            **exposure_fields(exposure, plain.wall_s),
            "asr_attack": attack.name,
            "backdoored": True,
            "cul_label_correct": exposure.backdoor_label == attack.target_label,
            "cul_row_auroc": roc_auc(margins, truth),
        }
        exposure_records.append(record(attack.name, "cul", None, exposure.wall_s, floor, cul_extra))
        emit([exposure_records[-1]])
        if "cul_filter" not in run_names:
            continue
        kept = train.select(np.flatnonzero(~dropped)).remove_columns(["poisoned", "orig_label"])
        filtered = runs.fine_tune_and_evaluate(
            training_args, model_name, label_names, kept, test_set, asr_sets[attack.name]
        )
        removal = detection_metrics(dropped, truth)
        filter_extra = {
            "asr_attack": attack.name,
            "overhead": round((filtered.wall_s + cul_wall) / plain.wall_s, 3),
            "overhead_epochs": round(cul_wall / epoch_s, 2),  # the exposure and scoring, before retraining
            "cul_label": exposure.backdoor_label,
            "removed_rows": int(dropped.sum()),
            "removed_precision": removal["precision"],
            "removed_recall": removal["recall"],
        }
        emit([record(attack.name, "cul_filter", filtered.evaluation, filtered.wall_s + cul_wall, floor, filter_extra)])
    clean_scores = [r["cul_score"] for r in exposure_records if not r["backdoored"]]
    if len(clean_scores) >= 2 and len(clean_scores) < len(exposure_records):
        # the threshold from the clean models only, the AUROC over every exposed model of this run
        threshold = detection_threshold(clean_scores)
        auroc = roc_auc([r["cul_score"] for r in exposure_records], [int(r["backdoored"]) for r in exposure_records])
        for r in exposure_records:
            r.update(detection_auroc=auroc, detection_threshold=threshold, flagged=r["cul_score"] > threshold)
        emit(exposure_records)


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/text_defenses.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    emit = records.RecordWriter(args.output)
    with tempfile.TemporaryDirectory() as tmp:
        run(args, command, Path(tmp) / "text", emit)
    records.print_defense_records(emit.written)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
