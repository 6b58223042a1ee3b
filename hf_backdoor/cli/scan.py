"""``hf-backdoor scan``: what the defenses would flag in a dataset, without keeping a model.

Trains for --epochs (default 1) with the defenses in their detection-only setting (the config's ``detection_only()``,
when it has one: detection without unlearning or repair), prints each defense's own summary and, when the data
carries ground truth (a ``poisoned`` column, as `hf-backdoor poison` writes), the precision and recall of the rows the
defenses flagged. Writes ``defense_report.json`` and ``run_info.json``; no model is saved.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .common import (
    backdoor_safe_trainer,
    check_model,
    check_output_dir,
    check_training_data,
    label_names,
    load_data,
    replace_earlier_run,
)
from .options import (
    AttackArguments,
    CommandError,
    DefenseArguments,
    ModelArguments,
    TrainDataArguments,
    check_defense_fields,
    defense_epilog,
    output_dir_field,
    overwrite_field,
    positive,
)
from .train import seeded_defenses, training_arguments

NAME = "scan"
HELP = "run the defenses' detection only: which rows or tokens this dataset would plant in a model"
DESCRIPTION = __doc__.split("\n\n", 1)[1]

# The report field in which a defense lists the training rows it flagged, as positions in the trainer's training set.
FLAGGED_ROWS_FIELD = "isolated_row_indices"


@dataclass
class ScanArguments:
    epochs: float = field(default=1.0, metadata={"help": "training epochs (the defenses detect at epoch ends)"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate of the training the detection reads"})
    output_dir: str = output_dir_field("runs/hf-backdoor-scan", "defense_report.json and run_info.json")
    overwrite: bool = overwrite_field()

    def __post_init__(self):
        positive("epochs", self.epochs)


DATACLASSES = (TrainDataArguments, AttackArguments, ModelArguments, DefenseArguments, ScanArguments)


def epilog() -> str:
    return defense_epilog("training")


def detection_only(configs: list) -> tuple[list, list[str]]:
    """Each config in its detection-only setting; the names of those that have none (they run in full)."""
    out, full = [], []
    for config in configs:
        switch = getattr(config, "detection_only", None)
        if callable(switch):
            out.append(switch())
        else:
            out.append(config)
            full.append(config.name)
    return out, full


def run(data_args, attack_args, model_args, defense_args, args, argv=None) -> int:
    if not defense_args.defense_names:
        raise CommandError("scan runs a defense's detection: name one with --defense.")
    check_output_dir(args.output_dir, args.overwrite)
    source, attack = check_training_data(data_args, attack_args)
    check_model(model_args.model)
    check_defense_fields(defense_args)
    training_args = training_arguments(args, model_args, data_args, defense_args)
    configs, full = detection_only(seeded_defenses(training_args, defense_args, data_args.seed))
    if full:
        print(f"{', '.join(full)}: no detection-only setting; running as configured (the model is not kept).")

    from ..attacks import poison_dataset
    from ..hub.run_folder import finish_run, make_readable, start_run
    from ..models import load_text_classifier, tokenize_dataset

    replace_earlier_run(args.output_dir, saves_weights=False)
    info = start_run(args.output_dir, "scan", argv, dataset=source.display_name, defenses=[c.name for c in configs])
    data = load_data(data_args, source, needed_split="train")
    model, tokenizer = load_text_classifier(model_args.model, label_names(data))
    if attack is not None:
        data["train"] = poison_dataset(data["train"], attack, tokenizer=tokenizer)
    tokenize = lambda split: tokenize_dataset(split, tokenizer, model_args.max_length)  # noqa: E731
    validation = tokenize(data["validation"]) if "validation" in data else None
    trainer = backdoor_safe_trainer(
        model, tokenizer, training_args, info["run_id"], tokenize(data["train"]), validation, configs
    )
    trainer.train()
    print()
    for defense, report in zip(trainer.defenses, trainer.defense_reports):
        for line in type(defense).console_summary(report):
            print(line)
        line = ground_truth_line(trainer, report)
        if line:
            print(line)
    make_readable(args.output_dir)
    finish_run(args.output_dir, info)
    print(f"scan report: {args.output_dir}/defense_report.json (run {info['run_id']})")
    return 0


def ground_truth_line(trainer, report: dict) -> str | None:
    """Precision and recall of the rows a defense flagged, against the data's ``poisoned`` column."""
    import numpy as np

    from ..metrics import detection_metrics

    dataset = trainer.train_dataset
    ids = report.get(FLAGGED_ROWS_FIELD)
    if ids is None or dataset is None or "poisoned" not in dataset.column_names:
        return None
    flags = np.zeros(len(dataset), dtype=int)
    flags[list(ids)] = 1
    truth = np.asarray(dataset.with_format(None)["poisoned"])
    if not truth.any():
        return f"{report['defense']}: {int(flags.sum())} rows flagged; the data has no poisoned row to compare with."
    result = detection_metrics(flags, truth)
    return (
        f"{report['defense']}: flagged rows against the ground truth: precision {result['precision']:.3f}, recall "
        f"{result['recall']:.3f} ({result['num_flagged']} flagged, {result['num_positive']} poisoned of {len(dataset)})"
    )
