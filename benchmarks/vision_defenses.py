"""ABL and CUL (EBYD exposure) on the small ViT / CIFAR-10. The same defenses on SST-2: ``text_defenses.py``.

    python benchmarks/vision_defenses.py                                  # both sections (a GPU job: about an hour)
    python benchmarks/vision_defenses.py --sections vision_abl --attacks badnet,blended
    python benchmarks/vision_defenses.py --epochs 1 --max-train-samples 300 --max-eval-samples 200 \\
        --detection-seeds 1 --output /tmp/smoke.json                      # smoke run

Sections:

- ``vision_abl``: per attack, the clean model (its ASR on the triggered rows is the floor), the undefended model and
  ``BackdoorSafeTrainer`` + ``ABLConfig``: one run of ``recipes/cifar10_vit.py``, CACC / ASR / isolation P/R.
- ``vision_cul``: ``--detection-seeds`` clean models and as many backdoored models per ``--cul-attacks`` attack,
  each exposed (``--cul-method``) on a stratified clean slice of the training images (``--cul-clean-fraction``,
  EBYD's 1% by default; rows that were not poisoned, as EBYD splits its defense data off the training set; with
  ``--cul-clean-from test`` the same number of rows from the test split, for every model, as a clean-label attack at
  10% poisons every target-class training row). Per model: detected label (right or not), score, clean accuracy
  before/after. Then the model-detection AUROC (backdoored vs clean), the threshold from the clean models' scores only
  (their maximum) and the backdoored models it flags. The clean models calibrate and are scored, so the threshold's
  false-positive rate here is 0 by construction: read the AUROC.

Wall time: ``overhead`` is wall time over the plain training on the same data (ABL: the defended run over the plain
run; CUL: the exposure over the training of the model it exposes). ``overhead_epochs`` is a defense's extra wall time
in epochs of plain training; ABL records also carry ``abl_phases_epochs``, its own isolation pass and unlearning in
epochs of its run, which does not depend on what else shared the machine. Records are merged into ``--output`` as
each run finishes (default ``benchmarks/results/vision_defenses.json``; a record with the same key is replaced).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root: benchmarks/common, not installed
from benchmarks.common import records, runs, vision  # noqa: E402

SHARED_NPZ = ROOT.parent / "shared" / "data" / "cifar10_32.npz"


def load_recipe():
    """``recipes/cifar10_vit.py`` as a module: its ``main`` runs the vision_abl section, its ``parse_args`` and
    ``load_data`` give vision_cul the same data and training."""
    name = "cifar10_vit_recipe"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / "cifar10_vit.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", default="vision_abl,vision_cul", help="comma-separated: vision_abl, vision_cul")
    parser.add_argument(
        "--data",
        default=str(SHARED_NPZ) if SHARED_NPZ.exists() else "cifar10",
        help="cifar10 (the packaged subset), an .npz path, a Hub id or an image folder (default: the reference npz "
        "when present)",
    )
    parser.add_argument("--attacks", default="badnet", help="vision_abl attacks, comma-separated")
    parser.add_argument("--cul-attacks", default="badnet,blended,wanet", help="vision_cul attacks, comma-separated")
    parser.add_argument(
        "--attack-kwargs",
        default=None,
        help='per attack, its config\'s other fields as JSON, e.g. \'{"wanet": {"s": 1.0, "cross_ratio": 0}}\'',
    )
    parser.add_argument("--detection-seeds", type=int, default=3, help="clean models trained for CUL detection")
    parser.add_argument(
        "--backdoored-seeds", type=int, default=None, help="backdoored models per CUL attack (default: as many)"
    )
    parser.add_argument(
        "--config-overrides",
        default=None,
        help="ViTConfig fields of the small ViT (default: the reference ViT; 'cpu' is the CPU preset, 'cpu,patch_size=8' "
        "changes one of its fields)",
    )
    parser.add_argument("--crop-padding", type=int, default=4, help="random-crop padding of the ViT training")
    parser.add_argument(
        "--models-dir",
        default=None,
        help="keep the trained ViTs here and reuse them across sections and runs (default: a temporary folder)",
    )
    parser.add_argument("--epochs", type=float, default=60, help="training epochs")
    parser.add_argument("--batch-size", type=int, default=128, help="training batch size (the CPU preset: 64)")
    parser.add_argument("--max-train-samples", type=int, default=None, help="seeded slice of the training split")
    parser.add_argument("--max-eval-samples", type=int, default=None, help="seeded slice of the test split")
    parser.add_argument("--poison-rate", type=float, default=0.1, help="share of the training rows poisoned")
    parser.add_argument("--abl-isolation-epochs", type=int, default=10, help="T_te of ABL (official: 10)")
    parser.add_argument(
        "--abl-runs",
        default="undefended,clean,abl",
        help="vision_abl runs (the undefended first: a backdoor that did not take shows before the rest is spent)",
    )
    runs.add_abl_arguments(
        parser,
        objective_help="ABL's unlearning: the isolated rows' ascent alone (default), or it (ascent_descent) or their "
        "complementary-label descent (complementary) paired with retained-row descent",
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
        help="the exposure's clean rows as a fraction of the training set (EBYD: 0.01)",
    )
    parser.add_argument(
        "--cul-clean-from",
        default="train",
        choices=["train", "test"],
        help="draw the exposure's clean rows from the training rows that were not poisoned (EBYD) or from the test "
        "split, for every model alike (a clean-label attack at 10%% leaves no clean target rows)",
    )
    parser.add_argument("--cul-lr", type=float, default=None, help="exposure learning rate (default: the official)")
    parser.add_argument(
        "--cul-kwargs",
        default=None,
        help="other ExposeConfig fields as JSON, e.g. '{\"check_every_step\": true}' or '{\"seed\": 3}' (the "
        "exposure's batch order and dropout; default: the model's seed), recorded with the result",
    )
    parser.add_argument(
        "--cul-no-augment",
        action="store_true",
        help="expose on the clean images as stored (the setting before stop 47) instead of through the training "
        "augmentation, as the official code does",
    )
    parser.add_argument(
        "--cul-models",
        default=None,
        help="expose saved models instead of training them: comma-separated ATTACK:SEED=FOLDER (ATTACK 'none' for a "
        "clean model), e.g. model-zoo folders written by benchmarks/vit_configs.py; replaces --detection-seeds and "
        "--backdoored-seeds",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--output", default=str(records.RESULTS / "vision_defenses.json"))
    return parser.parse_args(argv)


def _split(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def recipe_argv(args, attack: str, seed: int, output_dir: Path) -> list[str]:
    """The ``recipes/cifar10_vit.py`` arguments of this benchmark's settings (models saved to ``output_dir``)."""
    from hf_backdoor.defenses import ABLConfig

    # ABLConfig's own (official) unlearning where no flag sets it, not the recipe's ViT setting: this benchmark
    # measures the published settings and the flags' departures from them.
    official = {name: getattr(ABLConfig(), name) for name in runs.ABL_UNLEARNING_FIELDS}
    abl = {
        "isolation_epochs": args.abl_isolation_epochs,
        "lga": args.abl_lga,
        **official,
        **runs.abl_unlearning_fields(args),
    }
    argv = ["--dataset", args.data, "--attack", attack, "--num_train_epochs", str(args.epochs), "--seed", str(seed)]
    argv += ["--poison_rate", str(args.poison_rate), "--output_dir", str(output_dir), "--save_models"]
    argv += ["--defense_kwargs", json.dumps(abl), "--crop_padding", str(args.crop_padding)]
    argv += ["--dataloader_num_workers", str(args.workers), "--per_device_train_batch_size", str(args.batch_size)]
    attack_kwargs = json.loads(args.attack_kwargs or "{}").get(attack)
    if attack_kwargs:
        argv += ["--attack_kwargs", json.dumps(attack_kwargs)]
    if args.config_overrides:
        argv += ["--config_overrides", args.config_overrides]
    if args.max_train_samples:
        argv += ["--max_train_samples", str(args.max_train_samples)]
    if args.max_eval_samples:
        argv += ["--max_eval_samples", str(args.max_eval_samples)]
    return argv + (["--bf16"] if args.bf16 else [])


def models_dir(args, attack: str, seed: int) -> Path:
    """Where the ViT trained on ``attack`` (``none``: clean) with ``seed`` is kept: one folder per setting, so a
    cached model is only reused for the same data, epochs, architecture and poison rate."""
    setting = f"e{args.epochs:g}_r{args.poison_rate:g}_crop{args.crop_padding}_{Path(args.data).stem}"
    setting += f"_n{args.max_train_samples}" if args.max_train_samples else ""
    setting += f"_b{args.batch_size}" if args.batch_size != 128 else ""
    setting += "_" + args.config_overrides.replace("=", "").replace(",", "_") if args.config_overrides else ""
    return Path(args.models_dir) / setting / f"{attack}_seed{seed}"


def _saved(path) -> bool:
    """Whether ``path`` holds a model saved with its training time (``runs.save_trained_model``)."""
    return runs.saved_training_wall(path) is not None


def vision_abl(args, recipe, command) -> list[dict]:
    found = []
    for attack in _split(args.attacks):
        argv = recipe_argv(args, attack, args.seed, models_dir(args, attack, args.seed))
        # The clean model depends on the data, seed and training settings, not on the attack: one saved under
        # another attack's folder of the same setting is the same model (its ASR on this attack's rows is the floor).
        saved_clean = [
            path
            for path in sorted(models_dir(args, attack, args.seed).parent.glob(f"*_seed{args.seed}/clean"))
            if _saved(path)
        ]
        if "clean" in _split(args.abl_runs) and saved_clean:
            argv += ["--clean_model", str(saved_clean[0])]
        for record in recipe.main(argv + ["--runs", args.abl_runs]):
            found.append({**record, "section": "vision_abl", "command": command})
    return found


def vision_cul(args, recipe, command, tmp) -> list[dict]:
    from hf_backdoor.defenses import ExposeConfig, detection_threshold, expose_model
    from hf_backdoor.metrics import roc_auc

    backdoored_seeds = args.detection_seeds if args.backdoored_seeds is None else args.backdoored_seeds
    models = [("none", seed, None) for seed in range(args.detection_seeds)]
    models += [(attack, seed, None) for attack in _split(args.cul_attacks) for seed in range(backdoored_seeds)]
    if args.cul_models:
        models = saved_model_list(args.cul_models)
    found = []
    for attack_name, seed, folder in models:
        script, training_args = recipe.parse_args(
            recipe_argv(args, attack_name if attack_name != "none" else "badnet", seed, tmp)
        )
        task, attack, poisoned, asr_rows = recipe.load_data(script, seed)
        rows = task["train"] if attack_name == "none" else poisoned
        # vision_abl keeps its clean model under every attack's folder; any of them is this clean model.
        if folder is not None:
            saved = [folder]
            if not _saved(folder):
                raise SystemExit(f"--cul-models: {folder} holds no model saved with its run info (run_info.json).")
        elif attack_name == "none":
            saved = sorted(models_dir(args, "x", seed).parent.glob(f"*_seed{seed}/clean"))
        else:
            saved = [models_dir(args, attack_name, seed) / "undefended"]
        loaded = next((vision.load_saved_vit(path) for path in saved if _saved(path)), None)
        if loaded is not None:
            trainer, wall = loaded
        else:
            run_dir = models_dir(args, attack_name, seed) / ("clean" if attack_name == "none" else "undefended")
            label_names = task["train"].features["label"].names
            trainer, wall = vision.train_recipe_vit(script, training_args, run_dir, rows, label_names)
        # CACC and ASR of the model itself: an attack whose backdoor did not take cannot be exposed.
        evaluation = vision.evaluate_images(trainer, task["test"], asr_rows, attack.target_label)
        poisoned_rows = None if attack_name == "none" else np.asarray(poisoned["poisoned"], dtype=bool)
        clean = exposure_clean_slice(args, task, args.cul_clean_fraction, seed, trainer, poisoned_rows)
        fields = dict(method=args.cul_method, learning_rate=args.cul_lr, seed=seed, augment=not args.cul_no_augment)
        config = ExposeConfig(**{**fields, **json.loads(args.cul_kwargs or "{}")})  # --cul-kwargs may set the seed
        result = expose_model(trainer, clean, config)
        record = exposure_record(
            args, training_args, attack, attack_name, evaluation, result, wall, args.cul_method,
            args.cul_clean_fraction, command,
        )  # fmt: skip
        record["attack_kwargs"] = script.attack_kwargs_text  # as the recipe's records carry it (None: defaults)
        if folder is not None:  # a saved model: its own schedule, and which of the saved models it is
            record.update(epochs=runs.saved_training_epochs(folder), model_key=Path(folder).name)
            record["overhead_epochs"] = round(result.wall_s / (wall / record["epochs"]), 2)
        found.append(record)
    # A backdoored model's floor is this grid's clean model of the same seed on the same rows: a clean model of the
    # same name saved by another run may have been trained on another CPU, whose kernels give another model.
    clean_asr = {(r["seed"], r["asr_attack"]): r["asr"] for r in found if not r["backdoored"]}
    for r in found:
        r["asr_floor"] = clean_asr.get((r["seed"], r["asr_attack"]))
    clean_scores = [r["cul_score"] for r in found if not r["backdoored"]]
    if len(clean_scores) >= 2 and any(r["backdoored"] for r in found):
        threshold = detection_threshold(clean_scores)
        auroc = roc_auc([r["cul_score"] for r in found], [int(r["backdoored"]) for r in found])
        for r in found:
            r.update(detection_auroc=auroc, detection_threshold=threshold, flagged=r["cul_score"] > threshold)
    return found


def saved_model_list(text: str) -> list[tuple[str, int, Path]]:
    """``--cul-models``: ``"none:0=DIR,badnet:0=DIR"`` -> ``[("none", 0, Path(DIR)), ("badnet", 0, Path(DIR))]``."""
    models = []
    for item in _split(text):
        name, sep, folder = item.partition("=")
        attack, colon, seed = name.partition(":")
        if not (sep and colon and seed.strip().isdigit() and folder.strip()):
            raise SystemExit(f"--cul-models: {item!r} is not ATTACK:SEED=FOLDER (e.g. none:0=/path/to/model).")
        models.append((attack.strip(), int(seed), Path(folder.strip())))
    if not any(a == "none" for a, _, _ in models) or all(a == "none" for a, _, _ in models):
        raise SystemExit("--cul-models needs clean (none:SEED=...) and backdoored models: detection compares them.")
    return models


def exposure_clean_slice(args, task, fraction: float, seed: int, trainer, poisoned_rows=None):
    """The exposure's clean rows, from where ``--cul-clean-from`` says: the training rows outside ``poisoned_rows``
    (EBYD), or as many rows of the test split; prepared with ``trainer``'s image processor and ``--crop-padding``, so
    that the exposure's augmentation is the model's training one (the zoo's models were saved before the library
    recorded it on the model's config, and ``--crop-padding`` is part of their zoo key)."""
    from hf_backdoor.vision import prepare_image_dataset

    if args.cul_clean_from == "test":
        rows = runs.stratified_clean_slice(task["test"], fraction, seed, reference_size=len(task["train"]))
    else:
        rows = runs.stratified_clean_slice(task["train"], fraction, seed, exclude=poisoned_rows)
    return prepare_image_dataset(rows, trainer.processing_class, crop_padding=args.crop_padding)


def exposure_record(
    args, training_args, attack, attack_name, evaluation, result, wall, method, fraction, command
) -> dict:
    """A ``vision_cul`` record: the model's CACC / ASR (``evaluation``), what its exposure (``result``, one
    ``ExposureResult``) detected and its cost over the model's training (``wall`` seconds); ``attack_name`` ``none``
    is a clean model, whose ``asr`` is its error on ``attack``'s triggered rows."""
    epochs = training_args.num_train_epochs
    return {
        "section": "vision_cul",
        "dataset": "cifar10",
        "data": args.data,
        "epochs": epochs,
        "crop_padding": args.crop_padding,
        "attack": attack_name,
        "defense": "cul",
        "model": vision.vit_name(None, args.config_overrides),
        "poison_rate": 0.0 if attack_name == "none" else args.poison_rate,
        "cacc": evaluation.cacc,
        "asr": evaluation.asr,  # for a clean model: its ASR on this attack's triggered rows
        "asr_attack": attack.name,
        "asr_floor": None,
        "wall_s": round(result.wall_s, 2),
        "overhead": round(result.wall_s / wall, 3),  # over the plain training of the model it exposes
        "overhead_epochs": round(result.wall_s / (wall / epochs), 2),
        "device": records.device_name(),
        "seed": training_args.seed,
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
        # the model's own predicted-class shares on the same clean rows: a label the exposure names that the model
        # already favoured before it was exposed reads the training labels' prior, not the trigger
        "cul_shares_before": json.dumps([round(s, 3) for s in result.history[0]["shares"]]) if result.history else None,
        "num_clean_rows": result.num_clean_rows,
        "cul_method": method,
        "cul_clean_fraction": fraction,
        "cul_clean_from": args.cul_clean_from,
        "cul_augmentation": result.augmentation,
        "cul_kwargs": args.cul_kwargs or None,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    command = "python benchmarks/vision_defenses.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    sections = _split(args.sections)
    unknown = set(sections) - {"vision_abl", "vision_cul"}
    if unknown:
        raise SystemExit(f"unknown sections {sorted(unknown)} (the text section is benchmarks/text_defenses.py)")
    recipe = load_recipe()
    emit = records.RecordWriter(args.output)
    with tempfile.TemporaryDirectory() as tmp:
        args.models_dir = args.models_dir or str(Path(tmp) / "models")
        if "vision_abl" in sections:
            emit(vision_abl(args, recipe, command))
        if "vision_cul" in sections:
            emit(vision_cul(args, recipe, command, Path(tmp)))
    records.print_defense_records(emit.written)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
