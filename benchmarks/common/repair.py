"""The sanitize recipes' shared half: which repair defenses run, on which clean rows, and their records.

Every defense starts from the same undefended weights and gets the same clean rows. ``--exposed`` runs RNP and NWC a
second time with EBYD's hand-off (``exposed=``: a CUL-exposed model replaces the defense's own clean unlearning); the
model is exposed once, on the same clean rows, and its wall time is added to each exposed record's ``wall_s``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import Trainer

from hf_backdoor.defenses import ExposeConfig, expose_model, prune_at_threshold, sanitize_model
from hf_backdoor.metrics import BackdoorEvaluation
from hf_backdoor.registry import DEFENSES

from . import records as records_io
from .runs import unpoisoned_rows

EXPOSURE = "cul"  # EBYD's exposure for --exposed: Clean Unlearning
RNP_UNITS = ("ffn", "head", "layernorm")
# The epoch counts of the repair configs (RNP's recovery, NAD's teacher and student, NWC's and plain fine-tuning):
# the fields --defense_epochs shortens for smoke runs. Unlearning phases stop on their own rule and keep their caps.
EPOCH_FIELDS = ("recovering_epochs", "teacher_epochs", "epochs", "finetune_epochs")


@dataclass
class RepairArguments:
    """What the sanitize recipes repair with; the model to repair is trained (or loaded) by the recipe."""

    defenses: str = field(default="rnp", metadata={"help": "Comma-separated repair defenses: rnp, nad, nwc, finetune."})
    rnp_units: str = field(
        default="ffn,layernorm", metadata={"help": f"Comma-separated unit kinds RNP masks ({', '.join(RNP_UNITS)})."}
    )
    defense_epochs: int | None = field(
        default=None, metadata={"help": "Override every defense's epochs (smoke runs); None keeps each config's."}
    )
    defense_overrides: str | None = field(
        default=None,
        metadata={
            "help": "Config fields per defense, e.g. 'nad.learning_rate=0.001,nwc.finetune_lr=0.001' (numbers, "
            "true/false, strings); part of a record's key."
        },
    )
    clean_fraction: float = field(
        default=0.05, metadata={"help": "The defenses' clean rows, as a fraction of the training-set size."}
    )
    clean_from: str = field(
        default="auto",
        metadata={
            "help": "Where the clean rows come from: train (unpoisoned training rows the model has seen, as the "
            "RNP/NAD/TSBD papers), held-out (the validation split, or without one test rows removed from the "
            "evaluation), or auto (text: the validation split when there is one; images: training rows).",
            "choices": ["auto", "train", "held-out"],
        },
    )
    load_model: str | None = field(
        default=None, metadata={"help": "A saved backdoored model to repair instead of training one."}
    )
    floor: bool = field(default=False, metadata={"help": "Also train a clean model: its ASR is the ASR floor."})
    floor_model: str | None = field(
        default=None, metadata={"help": "A saved clean model: its ASR on the same rows is the floor (no training)."}
    )
    exposed: bool = field(
        default=False,
        metadata={"help": "Also run RNP / NWC with EBYD's hand-off: a CUL-exposed model in place of their unlearning."},
    )
    score_sweep: bool = field(
        default=False,
        metadata={
            "help": "Also score every RNP threshold of its sweep on the test and ASR sets (analysis only: RNP "
            "chooses its threshold from held-out clean rows); stored in the record's rnp_sweep."
        },
    )
    results_json: str | None = field(default=None, metadata={"help": "Write the records here (a JSON list)."})

    def __post_init__(self):
        if self.floor and self.floor_model:
            raise SystemExit("--floor trains a clean model and --floor_model loads one: give one of them.")


@dataclass
class RepairSetup:
    """The undefended model (in ``trainer``), the rows the defenses get and how to score a model."""

    trainer: Trainer
    clean: Any  # prepared rows, in the form the trainer's model reads
    evaluate: Callable[[], BackdoorEvaluation]
    train_wall_s: float | None
    floor: float | None
    base_record: dict = field(default_factory=dict)


def parse_recipe_args(script_arguments, training_defaults: dict, output_dir: str, description: str, argv=None):
    """A sanitize recipe's ``(script, RepairArguments, TrainingArguments)``: its data, attack and model flags, the
    repair flags and every ``TrainingArguments`` field, with the recipe's reference training as defaults."""
    from transformers import HfArgumentParser, TrainingArguments

    from .launch import RecipeHelpFormatter, device_defaults

    parser = HfArgumentParser(
        (script_arguments, RepairArguments, TrainingArguments),
        description=description,
        formatter_class=RecipeHelpFormatter,
    )
    parser.set_defaults(**device_defaults(), **training_defaults, output_dir=output_dir)
    return parser.parse_args_into_dataclasses(argv)


def recipe_record(
    script,
    attack,
    model: str,
    seed: int,
    clean_source: str,
    modality: str,
    recipe: str,
    argv: list[str] | None,
    model_epochs: float | None = None,
) -> dict:
    """The fields every record of a sanitize recipe's run starts from: the data, the attack, the model and the epochs
    it was trained for (``None`` for a loaded model saved without them), where the clean rows came from, and the
    command (``argv`` None: the process's own arguments)."""
    return {
        "dataset": records_io.dataset_name(script.dataset),
        "data": script.dataset,
        "attack": attack.name,
        # an image attack's non-default settings (--attack_kwargs, JSON text); text recipes have none
        "attack_kwargs": getattr(script, "attack_kwargs_text", None),
        "model": model,
        "model_epochs": model_epochs,
        "poison_rate": script.poison_rate,
        "device": records_io.device_name(),
        "seed": seed,
        "command": records_io.command_line(recipe, sys.argv[1:] if argv is None else argv),
        "modality": modality,
        "target_label": attack.target_label,
        "clean_source": clean_source,
    }


def repair_configs(args: RepairArguments, seed: int) -> dict:
    """The repair defense configs ``--defenses`` names (any defense registered with stage ``repair``, the exposure
    aside: ``--exposed`` hands it over), with ``--rnp_units``, ``--defense_epochs`` and ``--defense_overrides``
    applied (an explicit override wins over ``--defense_epochs``), seeded by ``seed``."""
    classes = {
        name: entry.config_class
        for name, entry in DEFENSES.items()
        if getattr(entry.method_class, "stage", None) == "repair" and name != "expose"
    }
    names = [d.strip() for d in args.defenses.split(",") if d.strip()]
    if not names or set(names) - set(classes):
        raise SystemExit(f"--defenses must list some of {sorted(classes)}, got {args.defenses!r}")
    overrides = parse_defense_overrides(args.defense_overrides, classes)
    unused = set(overrides) - set(names)
    if unused:
        raise SystemExit(f"--defense_overrides names {sorted(unused)}, which --defenses {args.defenses!r} does not run")
    epochs = args.defense_epochs
    # --defense_epochs sets every epoch count a config has
    short = {name: {f: epochs for f in EPOCH_FIELDS if f in _field_names(classes[name])} for name in names}
    base = {"rnp": {"units": tuple(u.strip() for u in args.rnp_units.split(",") if u.strip())}}
    return {
        name: classes[name](
            seed=seed,
            **{**base.get(name, {}), **(short[name] if epochs is not None else {}), **overrides.get(name, {})},
        )
        for name in names
    }


def _field_names(config_class) -> set[str]:
    return {f.name for f in dataclasses.fields(config_class)}


def parse_defense_overrides(text: str | None, classes: dict) -> dict[str, dict]:
    """``"nad.learning_rate=0.001,finetune.epochs=5"`` -> ``{"nad": {"learning_rate": 0.001}, "finetune":
    {"epochs": 5}}``; values are read as true/false, int, float or string, and every field must be one of that
    config's."""
    overrides: dict[str, dict] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        key, sep, value = (part.strip() for part in item.partition("="))
        name, dot, field_name = key.partition(".")
        if not sep or not dot or not value:
            raise SystemExit(f"defense override {item!r} is not defense.field=value (e.g. 'nad.learning_rate=0.001')")
        if name not in classes:
            raise SystemExit(f"defense override {item!r}: {name!r} is not one of {sorted(classes)}")
        known = {f.name for f in dataclasses.fields(classes[name])}
        if field_name not in known:
            raise SystemExit(
                f"defense override {item!r}: {classes[name].__name__} has no field {field_name!r}; "
                f"its fields: {sorted(known)}"
            )
        if value.lower() in ("true", "false"):
            overrides.setdefault(name, {})[field_name] = value.lower() == "true"
            continue
        for cast in (int, float, str):
            try:
                overrides.setdefault(name, {})[field_name] = cast(value)
                break
            except ValueError:
                continue
    return overrides


def clean_split(args: RepairArguments, task, poisoned_train, seed: int, text: bool):
    """The defenses' clean rows, the test rows left to evaluate on, and where the clean rows came from.

    ``poisoned_train`` is the poisoned training split; only its unpoisoned rows can be clean training rows. ``auto``
    takes the validation split for text when the task has one, training rows otherwise.
    """
    count = args.clean_fraction * len(task["train"])
    source = args.clean_from
    if source == "auto":
        source = "held-out" if text and "validation" in task else "train"
    if source == "train":
        unpoisoned = task["train"].select(unpoisoned_rows(poisoned_train))
        return _clean_rows(unpoisoned, count, seed), task["test"], "unpoisoned train rows"
    if "validation" in task:
        return _clean_rows(task["validation"], count, seed), task["test"], "validation"
    test = task["test"].shuffle(seed=seed)
    count = max(10, int(round(count)))
    if count > len(test) // 2:
        raise SystemExit(
            f"--clean_from held-out: the task has no validation split, and {count} clean rows would take more than "
            f"half of its {len(test)} test rows. Lower --clean_fraction or use --clean_from train."
        )
    return test.select(range(count)), test.select(range(count, len(test))), "test rows held out of the evaluation"


def _clean_rows(dataset, count: float, seed: int):
    count = min(len(dataset), max(10, int(round(count))))
    return dataset.shuffle(seed=seed).select(range(count))


def score_recipe(setup: RepairSetup, configs: dict, args: RepairArguments, seed: int) -> list[dict]:
    """A sanitize recipe's last step: say what is repaired, :func:`repair_and_score` it, and write the records to
    ``--results_json`` when given (the main process prints and writes)."""
    main_process = setup.trainer.is_world_process_zero()
    run = setup.base_record
    if main_process:
        print(f"\n{run['data']} / {run['attack']} rate {run['poison_rate']} target {run['target_label']} / "
              f"{run['model']} / {len(setup.clean)} clean rows ({run['clean_source']})")  # fmt: skip
    all_records = repair_and_score(setup, configs, args, seed)
    if main_process and args.results_json:
        records_io.write_records(args.results_json, all_records)
    return all_records


def repair_and_score(setup: RepairSetup, configs: dict, args: RepairArguments, seed: int) -> list[dict]:
    """Score the undefended model, then run every defense (and its exposed variant with ``--exposed``) on the same
    undefended weights; prints each result line as it comes and returns the records (the trainer's model is left
    with the undefended weights)."""
    trainer = setup.trainer
    undefended_state = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    base = {
        **setup.base_record,
        "asr_floor": setup.floor,
        "num_clean_rows": len(setup.clean),
        "exposure": None,
        # Non-default defense settings: part of what a result is, and of its key in benchmarks/results/.
        "defense_overrides": args.defense_overrides or None,
    }
    evaluation = setup.evaluate()
    wall = None if setup.train_wall_s is None else round(setup.train_wall_s, 2)
    records = [{**base, "defense": "none", "cacc": evaluation.cacc, "asr": evaluation.asr, "wall_s": wall}]
    records[0]["overhead"] = None
    _print_line(trainer, records[-1], header=True)
    exposure = None
    for name, config in configs.items():
        records.append(_defend(setup, undefended_state, {**base, "defense": name}, config, args.score_sweep))
        _print_line(trainer, records[-1])
        if args.exposed and config.accepts_exposed:
            if exposure is None:  # expose once, on the undefended weights, and hand the same model to RNP and NWC
                exposure = _expose(setup, undefended_state, seed)
            record = {**base, "defense": name, "exposure": EXPOSURE}
            records.append(_defend(setup, undefended_state, record, config, args.score_sweep, exposure))
            _print_line(trainer, records[-1])
    trainer.model.load_state_dict(undefended_state)
    return records


def _label(record: dict) -> str:
    """``rnp``, or ``rnp+cul`` for the exposed variant."""
    return record["defense"] + (f"+{record['exposure']}" if record.get("exposure") else "")


def _print_line(trainer, record: dict, header: bool = False) -> None:
    if not trainer.is_world_process_zero():
        return
    if header:
        print(f"\n{'defense':<10}{'CACC':>8}{'ASR':>8}{'floor':>8}{'wall s':>9}{'overhead':>10}  details", flush=True)
    label = _label(record)
    if record.get("error"):
        print(f"{label:<10}{'failed':>8}{'':>8}{'':>8}{'':>9}{'':>10}  {record['error']}", flush=True)
        return
    floor = records_io.shown(record["asr_floor"])
    wall = records_io.shown(record["wall_s"], ".1f")
    overhead = records_io.shown(record["overhead"], ".2f", "x")
    print(
        f"{label:<10}{record['cacc']:>8.3f}{record['asr']:>8.3f}{floor:>8}{wall:>9}{overhead:>10}  "
        f"{record.get('details', '')}",
        flush=True,
    )


def _expose(setup: RepairSetup, undefended_state: dict, seed: int):
    """The CUL-exposed copy of the undefended model (EBYD), or the error that stopped it (a result, not a crash)."""
    setup.trainer.model.load_state_dict(undefended_state)
    try:
        # expose_model rather than trainer.expose: the recipes' trainer is a plain transformers.Trainer
        return expose_model(setup.trainer, setup.clean, ExposeConfig(method=EXPOSURE, seed=seed))
    except (RuntimeError, ValueError) as err:
        return f"exposure failed: {err}"


def _defend(setup: RepairSetup, undefended_state: dict, record: dict, config, score_sweep: bool, exposure=None):
    """Run one defense on the undefended weights (with ``exposure`` handed over when given) and score it."""
    if config.name == "rnp":  # known before the run, so a failed RNP record still says what it tried
        record = {
            **record,
            "rnp_units": ",".join(config.units),
            "rnp_unlearning_stop": config.unlearning_stop,
            "rnp_recovering_lr": config.recovering_lr,
        }
    failed = {"cacc": None, "asr": None, "wall_s": None, "overhead": None}
    if isinstance(exposure, str):  # the exposure itself failed
        return {**record, **failed, "error": exposure}
    setup.trainer.model.load_state_dict(undefended_state)  # every defense repairs the same backdoored weights
    try:
        _, report = sanitize_model(setup.trainer, setup.clean, config, exposed=exposure)
    except (RuntimeError, ValueError) as err:  # a defense that cannot run here is a result, not a crash
        return {**record, **failed, "error": str(err)}
    evaluation = setup.evaluate()
    # An exposed variant costs its exposure too: the exposure is run once, but each variant would need it alone.
    wall = report["wall_s"] + (exposure.wall_s if exposure is not None else 0.0)
    record.update(
        cacc=evaluation.cacc,
        asr=evaluation.asr,
        wall_s=round(wall, 2),
        # Post-training cost against the training run it repairs (None when the model was loaded without its time).
        overhead=None if setup.train_wall_s is None else round(wall / setup.train_wall_s, 3),
        # None on text and on images read as stored (every vision record before stop 47)
        fit_augmentation=report.get("fit_augmentation"),
        **_summary(config.name, report),
    )
    if config.name == "rnp" and score_sweep:
        record["rnp_sweep"] = _score_sweep(setup, undefended_state, report)
    if exposure is not None:
        record.update(
            exposure_wall_s=round(exposure.wall_s, 2),
            exposure_clean_accuracy_before=exposure.clean_accuracy_before,
            exposure_clean_accuracy_after=exposure.clean_accuracy_after,
            exposure_exposed=exposure.exposed,
        )
    return record


def _score_sweep(setup: RepairSetup, undefended_state: dict, report: dict) -> str:
    """Test CACC and ASR of the undefended model pruned at each threshold of RNP's sweep, as the official code
    reports it: a JSON list of ``[threshold, units pruned, held-out accuracy, cacc, asr]`` in one string (records
    stay flat). Leaves the trainer's model pruned at the last threshold scored."""
    rows = []
    for point in report["threshold_sweep"]:
        if "holdout_accuracy" not in point:  # would prune every unit
            continue
        setup.trainer.model.load_state_dict(undefended_state)
        pruned = prune_at_threshold(setup.trainer.model, report, point["threshold"])
        evaluation = setup.evaluate()
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
