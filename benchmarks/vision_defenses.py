"""ABL and CUL (EBYD exposure) on the small ViT / CIFAR-10 and on the default text model / SST-2.

    python benchmarks/vision_defenses.py                                  # everything (a GPU job: about an hour)
    python benchmarks/vision_defenses.py --sections vision_abl --attacks badnets,blended
    python benchmarks/vision_defenses.py --sections text --text-attacks syntactic,style
    python benchmarks/vision_defenses.py --epochs 1 --max-train-samples 300 --max-eval-samples 200 \\
        --detection-seeds 1 --text-max-train-samples 300 --text-epochs 1 --output /tmp/smoke.json   # smoke run

Sections:

- ``vision_abl``: per attack, the clean model (its ASR on the triggered rows is the floor), the undefended model and
  ``BackdoorSafeTrainer`` + ``ABLConfig`` (``recipes/cifar10_vit.py``'s training), CACC / ASR / isolation P/R.
- ``vision_cul``: ``--detection-seeds`` clean models and as many backdoored models per ``--cul-attacks`` attack,
  each exposed (``--cul-method``) on a stratified clean slice of the training images (``--cul-clean-fraction``,
  EBYD's 1% by default; rows that were not poisoned, as EBYD splits its defense data off the training set; with
  ``--cul-clean-from test`` the same number of rows from the test split, for every model, as a clean-label attack at
  10% poisons every target-class training row). Per
  model: detected label (right or not), score, clean accuracy before/after. Then the model-detection AUROC
  (backdoored vs clean), the threshold from the clean models' scores only (their maximum) and the backdoored models
  it flags. The clean models calibrate and are scored, so the
  threshold's false-positive rate here is 0 by construction: read the AUROC.
- ``text``: SST-2 with the default text model (lr 1e-4, 3 epochs, batch 32, the reference recipe): per attack the
  clean model (floor), undefended, ABL, CUL exposure of the undefended model on 69 stratified validation rows
  (1% of train: label, score, row AUROC of the exposed margins), and ``cul_filter``: retrain without the training
  rows that carry the detected label and the highest exposed margins (``--cul-filter-ratio`` of the training set).
  With ``--text-detection-seeds N`` the ``cul`` run also exposes N clean models (seeds 0..N-1, each on its own
  stratified slice) and scores model detection as ``vision_cul`` does: threshold from the clean models only, AUROC
  over every model it exposed. ``--text-models-dir`` keeps the plain (clean, undefended) text models and reloads them,
  with their training time, in later runs.

Wall time: ``overhead`` is the results schema's ratio, wall time over the plain training on the same data (ABL: the
defended run over the plain run; CUL: the exposure over the training of the model it exposes; CUL filter: exposure,
scoring and retraining over the plain run). ``overhead_epochs`` is the issue's measure, a defense's extra wall time
in epochs of plain training (ABL: defended run minus plain run; CUL: the exposure; CUL filter: exposure + scoring);
ABL records also carry ``abl_phases_epochs``, its own isolation pass and unlearning in epochs of its run, which does
not depend on what else shared the machine. Records are merged into
``--output`` as each run finishes (default ``benchmarks/results/vision_defenses.json``; a record with the same key is
replaced).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from results_io import RESULTS, fill_floors, known_records, merge_records

ROOT = Path(__file__).resolve().parents[1]
TEXT_RUNS = ("clean", "undefended", "abl", "cul", "cul_filter")
SHARED_NPZ = ROOT.parent / "shared" / "data" / "cifar10_32.npz"


def _recipe():
    spec = importlib.util.spec_from_file_location("cifar10_vit_recipe", ROOT / "recipes" / "cifar10_vit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stratified_clean_slice(dataset, fraction: float, seed: int, exclude=None, reference_size: int | None = None):
    """``fraction`` of ``reference_size`` rows (default: ``dataset``'s size), the same number from every class of
    ``dataset``, seeded; ``exclude`` rows are never taken."""
    labels = np.asarray(dataset.with_format(None)["label"])
    allowed = np.ones(len(labels), dtype=bool) if exclude is None else ~np.asarray(exclude, dtype=bool)
    rng = np.random.default_rng(seed)
    per_class = max(1, int(round(fraction * (reference_size or len(labels)) / (labels.max() + 1))))
    picked = []
    for c in np.unique(labels):
        candidates = np.flatnonzero(allowed & (labels == c))
        if len(candidates) < per_class:
            raise ValueError(
                f"class {c} has {len(candidates)} usable clean rows, {per_class} needed: a clean-label attack "
                "poisons every target row once poison_rate reaches the target's share. Draw the clean rows from "
                "the test split (--cul-clean-from test) or lower the fraction."
            )
        picked.append(rng.choice(candidates, size=per_class, replace=False))
    return dataset.select(sorted(np.concatenate(picked).tolist()))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="vision_abl,vision_cul,text")
    parser.add_argument("--data", default=str(SHARED_NPZ) if SHARED_NPZ.exists() else "cifar10")
    parser.add_argument("--attacks", default="badnets", help="vision_abl attacks")
    parser.add_argument("--cul-attacks", default="badnets,blended,wanet")
    parser.add_argument("--detection-seeds", type=int, default=3, help="clean models trained for CUL detection")
    parser.add_argument(
        "--backdoored-seeds", type=int, default=None, help="backdoored models per CUL attack (default: as many)"
    )
    parser.add_argument(
        "--config-overrides",
        default=None,
        help="ViTConfig fields of the small ViT (default: the reference ViT; 'patch_size=8' is the CPU-sized one)",
    )
    parser.add_argument("--crop-padding", type=int, default=4, help="random-crop padding of the ViT training")
    parser.add_argument(
        "--models-dir",
        default=None,
        help="keep the trained ViTs here and reuse them across sections and runs (default: a temporary folder)",
    )
    parser.add_argument("--epochs", type=float, default=60)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--poison-rate", type=float, default=0.1)
    parser.add_argument("--abl-isolation-epochs", type=int, default=10, help="T_te of the vision ABL runs")
    parser.add_argument("--abl-lga", default="per_example", choices=["per_example", "batch", "none"])
    parser.add_argument(
        "--abl-runs",
        default="undefended,clean,abl",
        help="vision_abl runs (the undefended first: a backdoor that did not take shows before the rest is spent)",
    )
    parser.add_argument(
        "--abl-unlearning-epochs",
        type=int,
        default=None,
        help="ABL ascent epochs, vision and text (default: the recipe's)",
    )
    parser.add_argument(
        "--abl-unlearning-stop-accuracy",
        type=float,
        default=None,
        help="end ABL's ascent (vision and text) once the isolated rows' accuracy is at or below this (default: none)",
    )
    parser.add_argument(
        "--abl-unlearning-objective",
        default=None,
        choices=["ascent", "ascent_descent", "complementary"],
        help="ABL's unlearning, vision and text: the isolated rows' ascent alone, or it (ascent_descent) or their "
        "complementary-label descent (complementary) paired with retained-row descent",
    )
    parser.add_argument(
        "--abl-unlearning-guard-drop",
        type=float,
        default=None,
        help="text ABL: undo an unlearning step that costs the clean validation rows more than this much accuracy "
        "and halve the learning rate (default: no guard, as the paper)",
    )
    parser.add_argument("--workers", type=int, default=0, help="dataloader workers of the ViT training")
    parser.add_argument(
        "--cul-method",
        default="cul",
        choices=["cul", "random_label", "rnp_unlearning"],
        help="exposure method (EBYD's two, or RNP's SGD unlearning)",
    )
    parser.add_argument(
        "--cul-clean-fraction",
        type=float,
        default=0.01,
        help="vision_cul: the exposure's clean rows as a fraction of the training set (EBYD: 0.01)",
    )
    parser.add_argument(
        "--cul-clean-from",
        default="train",
        choices=["train", "test"],
        help="vision_cul: draw the exposure's clean rows from the training rows that were not poisoned (EBYD) or "
        "from the test split, for every model alike (a clean-label attack at 10%% leaves no clean target rows)",
    )
    parser.add_argument("--cul-lr", type=float, default=None, help="exposure learning rate (default: the official)")
    parser.add_argument("--text-attacks", default="badnet,syntactic,style")
    parser.add_argument("--text-model", default=None, help="Hub id or local path (default: the packaged MiniLM-L6)")
    parser.add_argument("--text-epochs", type=float, default=3.0)
    parser.add_argument("--text-max-train-samples", type=int, default=None)
    parser.add_argument("--text-max-eval-samples", type=int, default=None)
    parser.add_argument(
        "--text-runs",
        default=",".join(TEXT_RUNS),
        help="text runs per attack; without clean, the floor comes from a clean model in benchmarks/results/",
    )
    parser.add_argument(
        "--text-models-dir",
        default=None,
        help="keep the plain text models (clean, undefended) here and reuse them across runs (default: not kept)",
    )
    parser.add_argument(
        "--text-detection-seeds",
        type=int,
        default=0,
        help="with the cul run: expose this many clean text models (seeds 0..N-1) for CUL model detection",
    )
    parser.add_argument("--text-abl-ratio", type=float, default=0.01)
    parser.add_argument("--cul-filter-ratio", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--output", default=str(RESULTS / "vision_defenses.json"))
    return parser.parse_args(argv)


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


# ------------------------------------------------------------------------------------------------------ vision
def _recipe_argv(args, attack: str, seed: int, output_dir: Path) -> list[str]:
    argv = ["--data", args.data, "--attack", attack, "--epochs", str(args.epochs), "--seed", str(seed)]
    argv += ["--poison-rate", str(args.poison_rate), "--output-dir", str(output_dir), "--save-models"]
    argv += ["--abl-isolation-epochs", str(args.abl_isolation_epochs), "--abl-lga", args.abl_lga]
    if args.config_overrides:
        argv += ["--config-overrides", args.config_overrides]
    argv += ["--crop-padding", str(args.crop_padding), "--workers", str(args.workers)]
    if args.abl_unlearning_epochs is not None:
        argv += ["--abl-unlearning-epochs", str(args.abl_unlearning_epochs)]
    if args.abl_unlearning_stop_accuracy is not None:
        argv += ["--abl-unlearning-stop-accuracy", str(args.abl_unlearning_stop_accuracy)]
    if args.abl_unlearning_objective is not None:
        argv += ["--abl-unlearning-objective", args.abl_unlearning_objective]
    if args.max_train_samples:
        argv += ["--max-train-samples", str(args.max_train_samples)]
    if args.max_eval_samples:
        argv += ["--max-eval-samples", str(args.max_eval_samples)]
    return argv + (["--bf16"] if args.bf16 else [])


def _models_dir(args, attack: str, seed: int) -> Path:
    """Where the ViT trained on ``attack`` (``none``: clean) with ``seed`` is kept: one folder per setting, so a
    cached model is only reused for the same data, epochs, architecture and poison rate."""
    setting = f"e{args.epochs:g}_r{args.poison_rate:g}_crop{args.crop_padding}_{Path(args.data).stem}"
    setting += f"_n{args.max_train_samples}" if args.max_train_samples else ""
    setting += "_" + args.config_overrides.replace("=", "").replace(",", "_") if args.config_overrides else ""
    return Path(args.models_dir) / setting / f"{attack}_seed{seed}"


def vision_abl(args, recipe, command, tmp) -> list[dict]:
    from hf_backdoor.experiments import saved_training_wall

    records = []
    for attack in _split(args.attacks):
        argv = _recipe_argv(args, attack, args.seed, _models_dir(args, attack, args.seed))
        # The clean model depends on the data, seed and training settings, not on the attack: one saved under
        # another attack's folder of the same setting is the same model (its ASR on this attack's rows is the floor).
        saved_clean = [
            path
            for path in sorted(_models_dir(args, attack, args.seed).parent.glob(f"*_seed{args.seed}/clean"))
            if saved_training_wall(path) is not None
        ]
        if "clean" in _split(args.abl_runs) and saved_clean:
            argv += ["--clean-model", str(saved_clean[0])]
        for record in recipe.main(argv + ["--runs", args.abl_runs]):
            records.append({**record, "section": "vision_abl", "command": command})
    return records


def vision_cul(args, recipe, command, tmp) -> list[dict]:
    from hf_backdoor.defenses import ExposeConfig, detection_threshold, expose_model
    from hf_backdoor.experiments import save_trained_model
    from hf_backdoor.metrics import evaluate_backdoor, roc_auc
    from hf_backdoor.vision import prepare_image_dataset

    backdoored_seeds = args.detection_seeds if args.backdoored_seeds is None else args.backdoored_seeds
    models = [("none", seed) for seed in range(args.detection_seeds)]
    models += [(attack, seed) for attack in _split(args.cul_attacks) for seed in range(backdoored_seeds)]
    records = []
    for attack_name, seed in models:
        base = recipe.parse_args(_recipe_argv(args, attack_name if attack_name != "none" else "badnets", seed, tmp))
        task, attack, poisoned, asr_rows = recipe.load_data(base)
        rows = task["train"] if attack_name == "none" else poisoned
        label_names = task["train"].features["label"].names
        # vision_abl keeps its clean model under every attack's folder; any of them is this clean model.
        saved = [_models_dir(args, attack_name, seed) / "undefended"] if attack_name != "none" else []
        saved += (
            sorted(_models_dir(args, "x", seed).parent.glob(f"*_seed{seed}/clean")) if attack_name == "none" else []
        )
        loaded = next((found for found in map(recipe.load_saved_run, saved) if found is not None), None)
        if loaded is not None:
            trainer, wall = loaded
        else:
            run_dir = _models_dir(args, attack_name, seed) / ("clean" if attack_name == "none" else "undefended")
            trainer, wall = recipe.train_vit(base, rows, label_names, run_dir, seed=seed)
            save_trained_model(trainer, run_dir, wall, base.epochs)
        # CACC and ASR of the model itself: an attack whose backdoor did not take cannot be exposed.
        processor = trainer.processing_class
        evaluation = evaluate_backdoor(
            trainer,
            prepare_image_dataset(task["test"], processor),
            prepare_image_dataset(asr_rows, processor),
            target_label=attack.target_label,
        )
        poisoned_rows = None if attack_name == "none" else np.asarray(poisoned["poisoned"], dtype=bool)
        clean = exposure_clean_slice(args, task, args.cul_clean_fraction, seed, poisoned_rows)
        result = expose_model(
            trainer, clean, ExposeConfig(method=args.cul_method, learning_rate=args.cul_lr, seed=seed)
        )
        records.append(
            exposure_record(
                args,
                base,
                attack,
                attack_name,
                evaluation,
                result,
                wall,
                args.cul_method,
                args.cul_clean_fraction,
                command,
            )
        )
    clean_scores = [r["cul_score"] for r in records if not r["backdoored"]]
    if len(clean_scores) >= 2 and any(r["backdoored"] for r in records):
        threshold = detection_threshold(clean_scores)
        auroc = roc_auc([r["cul_score"] for r in records], [int(r["backdoored"]) for r in records])
        for r in records:
            r.update(detection_auroc=auroc, detection_threshold=threshold, flagged=r["cul_score"] > threshold)
    return records


def exposure_clean_slice(args, task, fraction: float, seed: int, poisoned_rows=None):
    """The exposure's clean rows, from where ``--cul-clean-from`` says: the training rows outside ``poisoned_rows``
    (EBYD), or as many rows of the test split."""
    if args.cul_clean_from == "test":
        return stratified_clean_slice(task["test"], fraction, seed, reference_size=len(task["train"]))
    return stratified_clean_slice(task["train"], fraction, seed, exclude=poisoned_rows)


def exposure_record(args, base, attack, attack_name, evaluation, result, wall, method, fraction, command) -> dict:
    """A ``vision_cul`` record: the model's CACC / ASR (``evaluation``), what its exposure (``result``, one
    ``ExposureResult``) detected and its cost over the model's training (``wall`` seconds); ``attack_name`` ``none``
    is a clean model, whose ``asr`` is its error on ``attack``'s triggered rows."""
    from hf_backdoor.experiments import device_name
    from hf_backdoor.vision import describe_default_vit, parse_config_overrides

    return {
        "section": "vision_cul",
        "dataset": "cifar10",
        "data": base.data,
        "epochs": base.epochs,
        "crop_padding": base.crop_padding,
        "attack": attack_name,
        "defense": "cul",
        "model": describe_default_vit(**parse_config_overrides(args.config_overrides)),
        "poison_rate": 0.0 if attack_name == "none" else args.poison_rate,
        "cacc": evaluation.cacc,
        "asr": evaluation.asr,  # for a clean model: its ASR on this attack's triggered rows
        "asr_attack": attack.name,
        "asr_floor": None,
        "wall_s": round(result.wall_s, 2),
        "overhead": round(result.wall_s / wall, 3),  # over the plain training of the model it exposes
        "overhead_epochs": round(result.wall_s / (wall / base.epochs), 2),
        "device": device_name(),
        "seed": base.seed,
        "command": command,
        "backdoored": attack_name != "none",
        "cul_label": result.backdoor_label,
        "cul_label_correct": None if attack_name == "none" else result.backdoor_label == attack.target_label,
        "cul_score": result.score,
        "cul_exposed": result.exposed,
        "cul_clean_acc_before": result.clean_accuracy_before,
        "cul_clean_acc_after": result.clean_accuracy_after,
        "cul_learning_rate": result.learning_rate,
        "cul_epochs": len(result.history) - 1,
        "cul_shares": json.dumps([round(s, 3) for s in result.label_shares]),
        "num_clean_rows": result.num_clean_rows,
        "cul_method": method,
        "cul_clean_fraction": fraction,
        "cul_clean_from": args.cul_clean_from,
    }


# -------------------------------------------------------------------------------------------------------- text
def text_abl_config(args):
    """ABL on the text model: isolation after one LGA epoch (the reference found later isolation picks clean rows),
    ``--text-abl-ratio`` isolated, and ``--abl-lga`` and the unlearning flags shared with the vision runs (unset: ABL's
    defaults)."""
    from hf_backdoor.defenses import ABLConfig

    unlearning = {
        "unlearning_epochs": args.abl_unlearning_epochs,
        "unlearning_stop_accuracy": args.abl_unlearning_stop_accuracy,
        "unlearning_objective": args.abl_unlearning_objective,
        "unlearning_guard_drop": args.abl_unlearning_guard_drop,
    }
    return ABLConfig(
        isolation_epochs=1,
        isolation_ratio=args.text_abl_ratio,
        lga=args.abl_lga,
        seed=args.seed,
        **{k: v for k, v in unlearning.items() if v is not None},
    )


def _text_models_dir(args, settings) -> Path | None:
    """Where the plain text models of this setting are kept (``--text-models-dir``): one folder per model, data size,
    epochs and poison rate, so a cached model is only reused for the same training."""
    if not args.text_models_dir:
        return None
    from hf_backdoor.models import model_display_name

    setting = f"{model_display_name(settings.model_name).replace('/', '_')}_e{settings.epochs:g}_r{args.poison_rate:g}"
    setting += f"_n{args.text_max_train_samples}" if args.text_max_train_samples else ""
    return Path(args.text_models_dir) / setting


def text_section(args, command, tmp, emit) -> None:
    from hf_backdoor import default_text_model, make_asr_dataset, poison_dataset, tokenize_dataset
    from hf_backdoor.defenses import ExposeConfig, detection_threshold, expose_model
    from hf_backdoor.experiments import (
        TextRunSettings,
        attack_for_task,
        cached_plain_run,
        device_name,
        fine_tune_and_evaluate,
        load_experiment_task,
    )
    from hf_backdoor.metrics import detection_metrics, roc_auc
    from hf_backdoor.models import load_text_tokenizer, model_display_name

    settings = TextRunSettings(
        model_name=args.text_model or default_text_model(), epochs=args.text_epochs, seed=args.seed, bf16=args.bf16
    )
    task = load_experiment_task("sst2", args.text_max_train_samples, args.text_max_eval_samples, args.seed)
    label_names = task["train"].features["label"].names
    tokenizer = load_text_tokenizer(settings.model_name)
    test_set = tokenize_dataset(task["test"], tokenizer, settings.max_length)
    attacks = [
        attack_for_task(a, "sst2", poison_rate=args.poison_rate, seed=args.seed) for a in _split(args.text_attacks)
    ]
    asr_sets = {
        a.name: tokenize_dataset(make_asr_dataset(task["test"], a), tokenizer, settings.max_length) for a in attacks
    }
    out, models_dir = Path(tmp) / "text", _text_models_dir(args, settings)

    def run_dir(attack_name: str, seed: int, kind: str) -> Path | None:
        return models_dir / f"{attack_name}_seed{seed}" / kind if models_dir else None

    def plain_run(train_rows, attack_name: str, seed: int, kind: str, asr_attack: str):
        return cached_plain_run(
            dataclasses.replace(settings, seed=seed),
            label_names,
            train_rows,
            test_set,
            asr_sets[asr_attack],
            out,
            run_dir(attack_name, seed, kind),
        )

    def expose(trainer, seed: int):
        # 69 stratified validation rows: 1% of the training set, as EBYD's defense data
        clean_dev = stratified_clean_slice(task["validation"], 69 / len(task["validation"]), seed)
        return expose_model(
            trainer, clean_dev, ExposeConfig(method=args.cul_method, learning_rate=args.cul_lr, seed=seed)
        )

    def record(attack, defense, evaluation, wall, floor, extra=None):
        return {
            "section": "text",
            "dataset": "sst2",
            "attack": attack,
            "defense": defense,
            "model": model_display_name(settings.model_name),
            "poison_rate": 0.0 if attack == "none" else args.poison_rate,
            "cacc": evaluation.cacc if evaluation else None,
            "asr": evaluation.asr if evaluation else None,
            "asr_floor": floor,
            "wall_s": round(wall, 2),
            "overhead": extra.pop("overhead", None) if extra else None,
            "device": device_name(),
            "seed": args.seed,
            "command": command,
            **(extra or {}),
        }

    def exposure_fields(exposure, plain_wall: float) -> dict:
        return {
            "overhead": round(exposure.wall_s / plain_wall, 3),
            "overhead_epochs": round(exposure.wall_s / (plain_wall / settings.epochs), 2),
            "cul_label": exposure.backdoor_label,
            "cul_score": exposure.score,
            "cul_shares": json.dumps([round(s, 3) for s in exposure.label_shares]),
            "cul_exposed": exposure.exposed,
            "cul_clean_acc_before": exposure.clean_accuracy_before,
            "cul_clean_acc_after": exposure.clean_accuracy_after,
            "cul_learning_rate": exposure.learning_rate,
            "cul_method": args.cul_method,
        }

    runs = set(_split(args.text_runs))
    if not runs or runs - set(TEXT_RUNS):
        raise SystemExit(f"--text-runs must list some of {TEXT_RUNS}, got {args.text_runs!r}")
    if runs & {"abl", "cul", "cul_filter"}:
        runs.add("undefended")  # what ABL's overhead is measured against and what CUL exposes
    exposure_records = []
    if args.text_detection_seeds and runs & {"cul", "cul_filter"}:
        # Clean models calibrate the model-detection threshold: seeds 0..N-1, each exposed on its own clean slice.
        for seed in range(args.text_detection_seeds):
            clean = plain_run(task["train"], "none", seed, "clean", attacks[0].name)
            exposure = expose(clean.trainer, seed)
            extra = {**exposure_fields(exposure, clean.wall_s), "seed": seed, "backdoored": False}
            extra.update(model_cacc=clean.evaluation.cacc)
            exposure_records.append(record("none", "cul", None, exposure.wall_s, None, extra))
            emit([exposure_records[-1]])
    for attack in attacks:
        floor = epoch_s = None
        if "clean" in runs:
            clean = plain_run(task["train"], "none", args.seed, "clean", attack.name)
            floor, epoch_s = clean.evaluation.asr, clean.wall_s / settings.epochs
            emit([record("none", "none", clean.evaluation, clean.wall_s, None, {"asr_attack": attack.name})])
        train = poison_dataset(task["train"], attack, tokenizer=tokenizer)
        truth = np.asarray(train["poisoned"], dtype=bool)
        plain = plain_run(train, attack.name, args.seed, "undefended", attack.name)
        epoch_s = epoch_s or plain.wall_s / settings.epochs
        emit([record(attack.name, "none", plain.evaluation, plain.wall_s, floor, {"asr_attack": attack.name})])
        if "abl" in runs:
            abl_config = text_abl_config(args)
            abl = fine_tune_and_evaluate(
                settings,
                label_names,
                train,
                test_set,
                asr_sets[attack.name],
                out,
                defense=abl_config,
                # the guard's clean rows: the validation split, never the test rows that CACC and ASR are read on
                eval_dataset=task["validation"] if abl_config.unlearning_guard_drop is not None else None,
            )
            isolation = abl.trainer.defense_report["isolation"]
            guard = abl.trainer.defense_report["unlearning_guard"]  # {} when the guard is off
            abl_extra = {
                "asr_attack": attack.name,
                "overhead": round(abl.wall_s / plain.wall_s, 3),
                "overhead_epochs": round((abl.wall_s - plain.wall_s) / epoch_s, 2),
                "abl_phases_epochs": round(
                    sum(abl.trainer.defense_report["timings_s"].values()) / (abl.wall_s / settings.epochs), 3
                ),
                "abl_isolation_precision": isolation.get("precision"),
                "abl_isolation_recall": isolation.get("recall"),
                "abl_loss_auroc": isolation.get("loss_auroc"),
                "abl_precision_at_10pct": isolation.get("at_ratio", {}).get("0.1", {}).get("precision"),
                # the ascent: epochs run and the isolated rows' accuracy on their (poisoned) labels per epoch
                "abl_unlearning_accuracy": json.dumps(
                    [round(h["isolated_accuracy"], 3) for h in abl.trainer.defense_report["unlearning"]]
                ),
                "abl_guard_undone_steps": len(guard["undone_steps"]) if guard else None,
                # the guard's held-out accuracy after each unlearning epoch (epoch 0: before unlearning)
                "abl_guard_accuracy": json.dumps(
                    [round(h["guard_accuracy"], 3) for h in abl.trainer.defense_report["unlearning"]]
                )
                if guard
                else None,
                # part of the results key: ABL runs of other settings keep their own records
                "abl_config": json.dumps(dataclasses.asdict(abl_config)),
            }
            emit([record(attack.name, "abl", abl.evaluation, abl.wall_s, floor, abl_extra)])
        if not runs & {"cul", "cul_filter"}:
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
        if "cul_filter" not in runs:
            continue
        kept = train.select(np.flatnonzero(~dropped)).remove_columns(["poisoned", "orig_label"])
        filtered = fine_tune_and_evaluate(settings, label_names, kept, test_set, asr_sets[attack.name], out)
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
        # as in vision_cul: the threshold from the clean models only, the AUROC over every exposed model of this run
        threshold = detection_threshold(clean_scores)
        auroc = roc_auc([r["cul_score"] for r in exposure_records], [int(r["backdoored"]) for r in exposure_records])
        for r in exposure_records:
            r.update(detection_auroc=auroc, detection_threshold=threshold, flagged=r["cul_score"] > threshold)
        emit(exposure_records)


def _key(record: dict) -> tuple:
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
    )


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/vision_defenses.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    sections = _split(args.sections)
    unknown = set(sections) - {"vision_abl", "vision_cul", "text"}
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)}")
    recipe = _recipe()
    new = []

    def emit(records: list[dict]) -> None:
        # Written as they come: a long run stopped later keeps what it finished. A record emitted again (the text
        # exposures, once the detection threshold is known) replaces its earlier copy.
        fill_floors(records, known_records(new + records))
        merge_records(Path(args.output), records, _key)
        keys = {_key(r) for r in records}
        new[:] = [r for r in new if _key(r) not in keys] + records

    with tempfile.TemporaryDirectory() as tmp:
        args.models_dir = args.models_dir or str(Path(tmp) / "models")
        runners = {
            "vision_abl": lambda: emit(vision_abl(args, recipe, command, tmp)),
            "vision_cul": lambda: emit(vision_cul(args, recipe, command, tmp)),
            "text": lambda: text_section(args, command, tmp, emit),
        }
        for section in ("vision_abl", "vision_cul", "text"):
            if section in sections:
                runners[section]()
    print(
        f"\n{'section':<11}{'attack':<10}{'defense':<11}{'seed':>5}{'CACC':>7}{'ASR':>7}{'floor':>7}{'overhead':>9}  notes"
    )
    for r in new:

        def fmt(v):
            return "-" if v is None else f"{v:.3f}"

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
        overhead = "-" if r.get("overhead_epochs") is None else f"{r['overhead_epochs']:.2f}ep"
        print(
            f"{r['section']:<11}{r['attack']:<10}{r['defense']:<11}{r['seed']:>5}{fmt(r['cacc']):>7}"
            f"{fmt(r['asr']):>7}{fmt(r['asr_floor']):>7}{overhead:>9}  {'; '.join(notes)}"
        )
    for section in ("vision_cul", "text"):
        detection = [r for r in new if "detection_auroc" in r and r["section"] == section]
        if not detection:
            continue
        flagged = sum(r["flagged"] for r in detection if r["backdoored"])
        print(
            f"CUL model detection ({section}): AUROC {detection[0]['detection_auroc']:.3f}; threshold "
            f"{detection[0]['detection_threshold']:.3f} (max over clean models) flags {flagged} of "
            f"{sum(r['backdoored'] for r in detection)} backdoored models"
        )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
