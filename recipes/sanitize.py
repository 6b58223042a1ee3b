"""Post-training backdoor removal: train (or load) a backdoored model, then repair it with a small clean set.

    accelerate launch recipes/sanitize.py                          # SST-2, BadNet 10%, default MiniLM, RNP
    python recipes/sanitize.py --defenses rnp,nad,nwc,finetune      # several defenses on the same backdoored model
    python recipes/sanitize.py --floor                              # also train a clean model (the ASR floor)
    python recipes/sanitize.py --load-model runs/sanitize/undefended   # repair a saved model instead of training
    python recipes/sanitize.py --modality vision --attack badnets   # small ViT on the packaged CIFAR-10 subset
    python recipes/sanitize.py --defenses rnp,nwc --exposed         # also EBYD's variants: CUL-exposed model first

Every defense starts from the same undefended weights and gets the same clean rows: ``--clean-fraction`` (5%) of the
training-set size. ``--clean-from`` says where they come from: ``train`` (unpoisoned training rows, which the model
has seen: the setting of the RNP/NAD/TSBD papers), ``held-out`` (rows the model never saw: the validation split, or,
without one, rows drawn from the test split and removed from the evaluation) or ``auto`` (the default: the
validation split for text when the task has one, training rows otherwise). Defenses choose their thresholds on a
held-out part of these rows, so the source matters: a model that memorised its training rows loses accuracy on them
faster than on new data when pruned.
Prints CACC and ASR before and after each defense, beside the ASR floor when ``--floor`` trained a clean model, and
each defense's wall time; ``--results-json`` writes the records.

``--exposed``: after RNP and after NWC, run the same defense again on the same undefended weights with EBYD's
hand-off (``exposed=``: the CUL-exposed model replaces the defense's own clean unlearning). The model is exposed once,
on the same clean rows, and reused; its wall time is added to each exposed record's ``wall_s``. Records carry
``exposure``: ``None`` for the plain runs, ``"cul"`` for the exposed ones (``defense`` stays ``rnp`` / ``nwc``). The
exposure sees every clean row, including those the defense holds out to choose its threshold.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

RNP_UNITS = ("ffn", "head", "layernorm")
EXPOSURE = "cul"  # EBYD's exposure for --exposed: Clean Unlearning


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--modality", default="text", choices=["text", "vision"])
    parser.add_argument("--dataset", default=None, help="default: sst2 (text) or cifar10 (vision)")
    parser.add_argument("--attack", default=None, help="default: badnet (text) or badnets (vision)")
    parser.add_argument("--poison-rate", type=float, default=0.1)
    parser.add_argument("--target-label", type=int, default=None, help="default: the task's usual target (vision: 0)")
    parser.add_argument("--model", default=None, help="Hub id or local path (default: MiniLM-L6 / the small ViT)")
    parser.add_argument(
        "--config-overrides", default=None, help="vision: ViTConfig fields of the small ViT, e.g. 'patch_size=8'"
    )
    parser.add_argument("--load-model", default=None, help="a saved backdoored model to repair instead of training")
    parser.add_argument("--defenses", default="rnp", help="comma-separated: rnp, nad, nwc, finetune")
    parser.add_argument(
        "--rnp-units", default="ffn,layernorm", help=f"comma-separated unit kinds for RNP ({','.join(RNP_UNITS)})"
    )
    parser.add_argument("--defense-epochs", type=int, default=None, help="override every defense's epochs (smoke runs)")
    parser.add_argument(
        "--defense-overrides",
        default=None,
        help="config fields per defense, e.g. 'nad.learning_rate=0.001,nwc.finetune_lr=0.001' (numbers, true/false, strings)",
    )
    parser.add_argument("--clean-fraction", type=float, default=0.05, help="clean rows as a fraction of the train size")
    parser.add_argument(
        "--clean-from",
        default="auto",
        choices=["auto", "train", "held-out"],
        help="where the clean rows come from (see above); held-out without a validation split takes test rows",
    )
    parser.add_argument("--floor", action="store_true", help="train a clean model too: its ASR is the floor")
    parser.add_argument(
        "--floor-model", default=None, help="a saved clean model: its ASR on the same rows is the floor (no training)"
    )
    parser.add_argument(
        "--exposed",
        action="store_true",
        help="also run RNP / NWC with EBYD's hand-off: a CUL-exposed model in place of their own clean unlearning",
    )
    parser.add_argument(
        "--score-sweep",
        action="store_true",
        help="also score every RNP threshold of the sweep on the test and ASR sets (analysis: the defense chooses "
        "its threshold from held-out clean rows only); stored in the record's rnp_sweep",
    )
    parser.add_argument("--epochs", type=float, default=None, help="training epochs (default: 3 text, 60 vision)")
    parser.add_argument("--lr", type=float, default=None, help="training lr (default: 1e-4 text, 1e-3 vision)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 32 text, 128 vision")
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--output-dir", default="runs/sanitize")
    parser.add_argument("--results-json", default=None)
    args = parser.parse_args(argv)
    vision = args.modality == "vision"
    args.dataset = args.dataset or ("cifar10" if vision else "sst2")
    args.attack = args.attack or ("badnets" if vision else "badnet")
    args.epochs = args.epochs if args.epochs is not None else (60.0 if vision else 3.0)
    args.lr = args.lr if args.lr is not None else (1e-3 if vision else 1e-4)
    args.batch_size = args.batch_size or (128 if vision else 32)
    if args.floor and args.floor_model:
        parser.error("--floor trains a clean model and --floor-model loads one: give one of them")
    return args


def defense_configs(args) -> dict:
    """The defense configs the recipe runs, by name."""
    from hf_backdoor.defenses import FinetuneConfig, NADConfig, NWCConfig, RNPConfig

    units = tuple(u.strip() for u in args.rnp_units.split(",") if u.strip())
    epochs = args.defense_epochs
    short = (
        {}
        if epochs is None
        else {
            "rnp": {"recovering_epochs": epochs},
            "nad": {"teacher_epochs": epochs, "epochs": epochs},
            "nwc": {"finetune_epochs": epochs},
            "finetune": {"epochs": epochs},
        }
    )
    classes = {"rnp": RNPConfig, "nad": NADConfig, "nwc": NWCConfig, "finetune": FinetuneConfig}
    names = [d.strip() for d in args.defenses.split(",") if d.strip()]
    unknown = set(names) - set(classes)
    if not names or unknown:
        raise SystemExit(f"--defenses must list some of {sorted(classes)}, got {args.defenses!r}")
    overrides = parse_defense_overrides(args.defense_overrides, classes)
    unused = set(overrides) - set(names)
    if unused:
        raise SystemExit(f"--defense-overrides names {sorted(unused)}, which --defenses {args.defenses!r} does not run")
    base = {"rnp": {"units": units}}
    return {
        name: classes[name](seed=args.seed, **{**base.get(name, {}), **short.get(name, {}), **overrides.get(name, {})})
        for name in names
    }


def parse_defense_overrides(text: str | None, classes: dict) -> dict[str, dict]:
    """``"nad.learning_rate=0.001,finetune.epochs=5"`` -> ``{"nad": {"learning_rate": 0.001}, "finetune":
    {"epochs": 5}}``; values are read as true/false, int, float or string, and every field must be one of that
    config's."""
    overrides: dict[str, dict] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = (part.strip() for part in item.partition("="))
        name, dot, field = key.partition(".")
        if not sep or not dot or not value:
            raise SystemExit(f"defense override {item!r} is not defense.field=value (e.g. 'nad.learning_rate=0.001')")
        if name not in classes:
            raise SystemExit(f"defense override {item!r}: {name!r} is not one of {sorted(classes)}")
        known = {f.name for f in dataclasses.fields(classes[name])}
        if field not in known:
            raise SystemExit(
                f"defense override {item!r}: {classes[name].__name__} has no field {field!r}; "
                f"its fields: {sorted(known)}"
            )
        if value.lower() in ("true", "false"):
            overrides.setdefault(name, {})[field] = value.lower() == "true"
            continue
        for cast in (int, float, str):
            try:
                overrides.setdefault(name, {})[field] = cast(value)
                break
            except ValueError:
                continue
    return overrides


class Experiment:
    """The data, the undefended trainer and how to score a model: one modality's half of the recipe."""

    trainer = None
    train_wall_s = None
    floor = None
    score_sweep = False


def text_experiment(args) -> Experiment:
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, Trainer

    from hf_backdoor import make_asr_dataset, poison_dataset, tokenize_dataset
    from hf_backdoor.arguments import BackdoorSafeTrainingArguments
    from hf_backdoor.experiments import (
        TextRunSettings,
        attack_for_task,
        fine_tune_and_evaluate,
        load_experiment_task,
        save_trained_model,
        saved_training_wall,
    )
    from hf_backdoor.metrics import compute_classification_metrics, evaluate_backdoor
    from hf_backdoor.models import default_text_model, load_text_tokenizer, model_display_name

    exp = Experiment()
    model_name = args.model or default_text_model()
    exp.model_display = model_display_name(model_name)
    task = load_experiment_task(args.dataset, args.max_train_samples, args.max_eval_samples, args.seed)
    label_names = task["train"].features["label"].names
    attack = attack_for_task(
        args.attack, args.dataset, poison_rate=args.poison_rate, target_label=args.target_label, seed=args.seed
    )
    exp.attack, exp.target = attack, attack.target_label
    # a saved model's own tokenizer (trainer.save_model writes it beside the weights), else the base model's
    tokenizer = load_text_tokenizer(args.load_model or model_name)
    poisoned = poison_dataset(task["train"], attack, tokenizer=tokenizer)
    clean, test, exp.clean_source = _clean_split(args, task, task["train"].select(np.flatnonzero(~_poisoned(poisoned))))
    exp.clean = tokenize_dataset(clean, tokenizer, args.max_length)
    exp.test = tokenize_dataset(test, tokenizer, args.max_length)
    exp.asr_set = tokenize_dataset(make_asr_dataset(test, attack), tokenizer, args.max_length)
    settings = TextRunSettings(
        model_name=model_name,
        learning_rate=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        max_length=args.max_length,
        seed=args.seed,
        bf16=args.bf16,
    )
    out = Path(args.output_dir)
    if args.load_model:
        model = AutoModelForSequenceClassification.from_pretrained(args.load_model)
        training_args = BackdoorSafeTrainingArguments(
            output_dir=str(out / "undefended"),
            per_device_eval_batch_size=128,
            report_to="none",
            seed=args.seed,
            bf16=args.bf16,
        )
        exp.trainer = Trainer(
            model=model,
            args=training_args,
            processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=compute_classification_metrics,
        )
        exp.train_wall_s = saved_training_wall(args.load_model)
    else:
        result = fine_tune_and_evaluate(
            settings, label_names, poisoned, exp.test, exp.asr_set, out / "undefended", target_label=exp.target
        )
        exp.trainer, exp.train_wall_s = result.trainer, result.wall_s
        save_trained_model(exp.trainer, out / "undefended", exp.train_wall_s, args.epochs)
    if args.floor:
        clean_run = fine_tune_and_evaluate(
            settings, label_names, task["train"], exp.test, exp.asr_set, out / "clean", target_label=exp.target
        )
        exp.floor = clean_run.evaluation.asr
    if args.floor_model:
        floor_trainer = Trainer(
            model=AutoModelForSequenceClassification.from_pretrained(args.floor_model),
            args=exp.trainer.args,
            processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
        )
        exp.floor = evaluate_backdoor(floor_trainer, exp.test, exp.asr_set, target_label=exp.target).asr
    exp.evaluate = lambda: evaluate_backdoor(exp.trainer, exp.test, exp.asr_set, target_label=exp.target)
    return exp


def vision_experiment(args) -> Experiment:
    try:
        from hf_backdoor.vision import (
            describe_default_vit,
            load_image_classifier,
            load_image_task,
            parse_config_overrides,
            prepare_image_dataset,
        )
    except ImportError as err:  # the vision package ships with hf_backdoor; a partial install lacks it
        raise SystemExit(f"--modality vision needs hf_backdoor.vision: {err}") from err
    from transformers import AutoModelForImageClassification, Trainer, TrainingArguments, set_seed

    from hf_backdoor import make_asr_dataset, poison_dataset
    from hf_backdoor.attacks.vision import get_image_attack_config
    from hf_backdoor.experiments import save_trained_model, saved_training_wall

    exp = Experiment()
    task = load_image_task(args.dataset)
    for split, limit in (("train", args.max_train_samples), ("test", args.max_eval_samples)):
        if limit:
            task[split] = task[split].shuffle(seed=args.seed).select(range(min(limit, len(task[split]))))
    label_names = task["train"].features["label"].names
    target = 0 if args.target_label is None else args.target_label
    attack = get_image_attack_config(args.attack, poison_rate=args.poison_rate, target_label=target, seed=args.seed)
    exp.attack, exp.target = attack, target
    overrides = parse_config_overrides(args.config_overrides)
    if overrides and args.model:
        raise SystemExit("--config-overrides changes the default small ViT; it cannot be combined with --model")
    exp.model_display = args.model or describe_default_vit(**overrides)
    set_seed(args.seed)
    model, processor = load_image_classifier(args.model, label_names, **overrides)
    poisoned = poison_dataset(task["train"], attack)
    unpoisoned = poisoned.select(np.flatnonzero(~_poisoned(poisoned))).remove_columns(["poisoned", "orig_label"])
    clean, test, exp.clean_source = _clean_split(args, task, unpoisoned)
    exp.clean = prepare_image_dataset(clean, processor)
    exp.test = prepare_image_dataset(test, processor)
    exp.asr_set = prepare_image_dataset(make_asr_dataset(test, attack), processor)
    out = Path(args.output_dir)

    def training_args(name, epochs):
        # The reference recipe: AdamW lr 1e-3, weight decay 0.05, label smoothing 0.1, batch 128, warm-up + cosine.
        return TrainingArguments(
            output_dir=str(out / name),
            learning_rate=args.lr,
            num_train_epochs=epochs,
            weight_decay=0.05,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=256,
            warmup_steps=0.1,
            lr_scheduler_type="cosine",
            label_smoothing_factor=0.1,
            bf16=args.bf16,
            seed=args.seed,
            save_strategy="no",
            eval_strategy="no",
            logging_steps=50,
            report_to="none",
            remove_unused_columns=False,
        )

    def train(model, rows, name):
        trainer = Trainer(
            model=model,
            args=training_args(name, args.epochs),
            train_dataset=prepare_image_dataset(rows, processor, train=True),
        )
        start = time.perf_counter()
        trainer.train()
        return trainer, time.perf_counter() - start

    if args.load_model:
        model = AutoModelForImageClassification.from_pretrained(args.load_model)
        if model.config.model_type == "vit" and not args.model:
            exp.model_display = describe_default_vit(
                **{k: getattr(model.config, k) for k in ("hidden_size", "num_hidden_layers", "patch_size")}
            )
        exp.trainer = Trainer(model=model, args=training_args("undefended", 1))
        exp.train_wall_s = saved_training_wall(args.load_model)
    else:
        exp.trainer, exp.train_wall_s = train(model, poisoned.remove_columns(["poisoned", "orig_label"]), "undefended")
        save_trained_model(exp.trainer, out / "undefended", exp.train_wall_s, args.epochs)
    if args.floor:
        set_seed(args.seed)
        clean_model, _ = load_image_classifier(args.model, label_names, **overrides)
        clean_trainer, _ = train(clean_model, task["train"], "clean")
        exp.floor = _evaluate_images(clean_trainer, exp.test, exp.asr_set, target).asr
    if args.floor_model:
        floor_trainer = Trainer(
            model=AutoModelForImageClassification.from_pretrained(args.floor_model), args=training_args("clean", 1)
        )
        exp.floor = _evaluate_images(floor_trainer, exp.test, exp.asr_set, target).asr
    exp.evaluate = lambda: _evaluate_images(exp.trainer, exp.test, exp.asr_set, target)
    return exp


def _evaluate_images(trainer, test, asr_set, target: int):
    """CACC and ASR on lazily transformed image sets (labels read without running the image transform)."""
    from hf_backdoor.metrics import BackdoorEvaluation, attack_success_rate, clean_accuracy, predict_labels

    labels = np.asarray(test.with_format(None)["label"])
    return BackdoorEvaluation(
        cacc=clean_accuracy(predict_labels(trainer, test), labels),
        asr=attack_success_rate(predict_labels(trainer, asr_set), target),
        num_clean=len(test),
        num_asr=len(asr_set),
    )


def _dataset_name(dataset: str) -> str:
    """The short name results use: ``cifar10`` for the packaged copy, the reference npz or the Hub dataset."""
    stem = Path(dataset).stem if Path(dataset).exists() else dataset
    return "cifar10" if stem.startswith("cifar10") or dataset == "uoft-cs/cifar10" else stem


def _poisoned(dataset) -> np.ndarray:
    return np.asarray(dataset.with_format(None)["poisoned"], dtype=bool)


def _clean_rows(dataset, count: float, seed: int):
    count = min(len(dataset), max(10, int(round(count))))
    return dataset.shuffle(seed=seed).select(range(count))


def _clean_split(args, task, unpoisoned_train):
    """The defenses' clean rows, the test rows left to evaluate on, and where the clean rows came from."""
    count = args.clean_fraction * len(task["train"])
    source = args.clean_from
    if source == "auto":
        source = "held-out" if args.modality == "text" and "validation" in task else "train"
    if source == "train":
        return _clean_rows(unpoisoned_train, count, args.seed), task["test"], "unpoisoned train rows"
    if "validation" in task:
        return _clean_rows(task["validation"], count, args.seed), task["test"], "validation"
    test = task["test"].shuffle(seed=args.seed)
    count = max(10, int(round(count)))
    if count > len(test) // 2:
        raise SystemExit(
            f"--clean-from held-out: the task has no validation split, and {count} clean rows would take more than "
            f"half of its {len(test)} test rows. Lower --clean-fraction or use --clean-from train."
        )
    return test.select(range(count)), test.select(range(count, len(test))), "test rows held out of the evaluation"


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    configs = defense_configs(args)
    from hf_backdoor.experiments import device_name

    exp = vision_experiment(args) if args.modality == "vision" else text_experiment(args)
    exp.score_sweep = args.score_sweep
    trainer = exp.trainer
    undefended_state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    command = "python " + shlex.join(["recipes/sanitize.py", *(sys.argv[1:] if argv is None else argv)])
    base = {
        "dataset": _dataset_name(args.dataset),
        "data": args.dataset,
        "attack": exp.attack.name,
        "model": exp.model_display,
        "poison_rate": args.poison_rate,
        "asr_floor": exp.floor,
        "device": device_name(),
        "seed": args.seed,
        "command": command,
        "modality": args.modality,
        "target_label": exp.target,
        "num_clean_rows": len(exp.clean),
        "clean_source": exp.clean_source,
        "exposure": None,
        # Non-default defense settings: part of what a result is, and of its key in benchmarks/results/.
        "defense_overrides": args.defense_overrides or None,
    }
    evaluation = exp.evaluate()
    records = [
        {
            **base,
            "defense": "none",
            "cacc": evaluation.cacc,
            "asr": evaluation.asr,
            "wall_s": None if exp.train_wall_s is None else round(exp.train_wall_s, 2),
            "overhead": None,
        }
    ]
    exposure = None
    for name, config in configs.items():
        records.append(_defend(exp, undefended_state, {**base, "defense": name}, config))
        if args.exposed and config.accepts_exposed:
            if exposure is None:  # expose once, on the undefended weights, and hand the same model to RNP and NWC
                exposure = _expose(exp, undefended_state, args.seed)
            record = {**base, "defense": name, "exposure": EXPOSURE}
            records.append(_defend(exp, undefended_state, record, config, exposure))
    trainer.model.load_state_dict(undefended_state)

    if trainer.is_world_process_zero():
        floor = "-" if exp.floor is None else f"{exp.floor:.3f}"
        print(
            f"\n{args.dataset} / {exp.attack.name} rate {args.poison_rate} target {exp.target} / {exp.model_display}"
            f" / {len(exp.clean)} clean rows ({exp.clean_source}) / ASR floor {floor}"
        )
        print(f"{'defense':<10}{'CACC':>8}{'ASR':>8}{'wall s':>9}{'overhead':>10}  details")
        for r in records:
            label = _label(r)
            if r.get("error"):
                print(f"{label:<10}{'failed':>8}{'':>8}{'':>9}{'':>10}  {r['error']}")
                continue
            wall = "-" if r["wall_s"] is None else f"{r['wall_s']:.1f}"
            overhead = "-" if r["overhead"] is None else f"{r['overhead']:.2f}x"
            print(f"{label:<10}{r['cacc']:>8.3f}{r['asr']:>8.3f}{wall:>9}{overhead:>10}  {r.get('details', '')}")
        if args.results_json:
            Path(args.results_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.results_json).write_text(json.dumps(records, indent=1) + "\n")
    return records


def _label(record: dict) -> str:
    """``rnp``, or ``rnp+cul`` for the exposed variant."""
    return record["defense"] + (f"+{record['exposure']}" if record.get("exposure") else "")


def _expose(exp: Experiment, undefended_state: dict, seed: int):
    """The CUL-exposed copy of the undefended model (EBYD), or the error that stopped it (a result, not a crash)."""
    from hf_backdoor.defenses import ExposeConfig, expose_model

    exp.trainer.model.load_state_dict(undefended_state)
    try:
        # expose_model rather than trainer.expose: the recipe's trainer is a plain transformers.Trainer
        return expose_model(exp.trainer, exp.clean, ExposeConfig(method=EXPOSURE, seed=seed))
    except (RuntimeError, ValueError) as err:
        return f"exposure failed: {err}"


def _defend(exp: Experiment, undefended_state: dict, record: dict, config, exposure=None) -> dict:
    """Run one defense on the undefended weights (with ``exposure`` handed over when given) and score it."""
    from hf_backdoor.defenses import sanitize_model

    if config.name == "rnp":  # known before the run, so a failed RNP record still says what it tried
        record = {
            **record,
            "rnp_units": ",".join(config.units),
            "rnp_unlearning_stop": config.unlearning_stop,
            "rnp_recovering_lr": config.recovering_lr,
        }
    if isinstance(exposure, str):  # the exposure itself failed
        return {**record, "cacc": None, "asr": None, "wall_s": None, "overhead": None, "error": exposure}
    exp.trainer.model.load_state_dict(undefended_state)  # every defense repairs the same backdoored weights
    try:
        _, report = sanitize_model(exp.trainer, exp.clean, config, exposed=exposure)
    except (RuntimeError, ValueError) as err:  # a defense that cannot run here is a result, not a crash
        return {**record, "cacc": None, "asr": None, "wall_s": None, "overhead": None, "error": str(err)}
    evaluation = exp.evaluate()
    # An exposed variant costs its exposure too: the exposure is run once, but each variant would need it alone.
    wall = report["wall_s"] + (exposure.wall_s if exposure is not None else 0.0)
    record.update(
        cacc=evaluation.cacc,
        asr=evaluation.asr,
        wall_s=round(wall, 2),
        # Post-training cost against the training run it repairs (None when the model was loaded).
        overhead=None if exp.train_wall_s is None else round(wall / exp.train_wall_s, 3),
        **_summary(config.name, report),
    )
    if config.name == "rnp" and exp.score_sweep:
        record["rnp_sweep"] = _score_sweep(exp, undefended_state, report)
    if exposure is not None:
        record.update(
            exposure_wall_s=round(exposure.wall_s, 2),
            exposure_clean_accuracy_before=exposure.clean_accuracy_before,
            exposure_clean_accuracy_after=exposure.clean_accuracy_after,
            exposure_exposed=exposure.exposed,
        )
    return record


def _score_sweep(exp: Experiment, undefended_state: dict, report: dict) -> str:
    """Test CACC and ASR of the undefended model pruned at each threshold of RNP's sweep, as the official code
    reports it: a JSON list of ``[threshold, units pruned, held-out accuracy, cacc, asr]`` in one string (records
    stay flat). Leaves the trainer's model pruned at the last threshold scored."""
    from hf_backdoor.defenses import prune_at_threshold

    rows = []
    for point in report["threshold_sweep"]:
        if "holdout_accuracy" not in point:  # would prune every unit
            continue
        exp.trainer.model.load_state_dict(undefended_state)
        pruned = prune_at_threshold(exp.trainer.model, report, point["threshold"])
        evaluation = exp.evaluate()
        rows.append(
            [
                point["threshold"],
                pruned,
                round(point["holdout_accuracy"], 4),
                round(evaluation.cacc, 4),
                round(evaluation.asr, 4),
            ]
        )
    return json.dumps(rows)


def _summary(name: str, report: dict) -> dict:
    """A few fields of a defense's report for the table and the JSON record."""
    fields = {
        "holdout_accuracy_before": report["holdout_accuracy_before"],
        "holdout_accuracy_after": report["holdout_accuracy_after"],
    }
    # What made the unlearned model: the defense's own ascent, or the exposure handed to it.
    unlearning = report.get("unlearned_by") or f"unlearning {report.get('unlearning_epochs')} epochs"
    if name == "rnp":
        fields.update(
            rnp_units=",".join(report["units"]),
            prune_threshold=report["prune_threshold"],
            num_pruned=report["num_pruned"],
            num_units=report["num_units"],
            unlearning_epochs=report["unlearning_epochs"],
            # Where the unlearned (or exposed) model sent the clean rows: its top class and that class's share.
            rnp_unlearned_label=report["unlearned_top_label"],
            rnp_unlearned_share=max(report["unlearned_prediction_shares"]),
            details=f"units {','.join(report['units'])}: pruned {report['num_pruned']}/{report['num_units']} at "
            f"mask <= {report['prune_threshold']} ({unlearning})",
        )
    elif name == "nwc":
        fields.update(
            n_ratio=report["n_ratio"],
            zeroed_weights=report["zeroing_zeroed_weights"],
            unlearning_epochs=report["unlearning_epochs"],
            details=f"n {report['n_ratio']}: {report['zeroing_zeroed_weights']} weights zeroed, held-out acc after "
            f"zeroing {report['holdout_accuracy_after_zeroing']:.3f} ({unlearning})",
        )
    elif name == "nad":
        fields.update(
            nad_layers=",".join(map(str, report["layers"])),
            details=f"layers {report['layers']}, teacher held-out acc {report['teacher_holdout_accuracy']:.3f}",
        )
    if "details" not in fields:
        fields["details"] = (
            f"held-out acc {report['holdout_accuracy_before']:.3f} -> {report['holdout_accuracy_after']:.3f}"
        )
    fields.update({f"time_{k}_s": round(v, 2) for k, v in report.get("timings_s", {}).items()})
    return fields


if __name__ == "__main__":
    main()
