"""``hf-backdoor sanitize``: post-training repairs of a saved model with a small clean set.

Runs the repairs named by --defense in order on the model in --model, using --clean-samples rows of --clean-split
(clean data the defender holds), and measures CACC and ASR before and after. The repaired model, its card (before and
after), the reports and ``run_info.json`` go to --output-dir.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .common import (
    backdoor_safe_trainer,
    check_output_dir,
    check_saved_model_data,
    evaluation_lines,
    label_names,
    load_data,
    load_saved_classifier,
    measure,
    measure_floor,
    replace_earlier_run,
    with_floor,
)
from .evaluate import asr_rows
from .options import (
    CommandError,
    DataArguments,
    FloorArguments,
    RepairArguments,
    SavedModelArguments,
    TriggerArguments,
    check_defense_fields,
    defense_epilog,
    output_dir_field,
    overwrite_field,
    positive,
)

NAME = "sanitize"
HELP = "post-training repairs of a saved model with a small clean set"
DESCRIPTION = __doc__.split("\n\n", 1)[1]


@dataclass
class SanitizeArguments:
    clean_split: str = field(default="validation", metadata={"help": "split the clean rows come from"})
    clean_samples: int = field(default=500, metadata={"help": "clean rows the repairs may use (a seeded sample)"})
    output_dir: str = output_dir_field("runs/hf-backdoor-sanitize", "the repaired model, card and reports")
    overwrite: bool = overwrite_field()

    def __post_init__(self):
        positive("clean-samples", self.clean_samples)


DATACLASSES = (
    SavedModelArguments,
    RepairArguments,
    DataArguments,
    TriggerArguments,
    FloorArguments,
    SanitizeArguments,
)


def epilog() -> str:
    return defense_epilog("repair")


def run(model_args, repair_args, data_args, trigger_args, floor_args, args, argv=None) -> int:
    from ..defenses.base import build_defenses

    if not repair_args.defense_names:
        raise CommandError("Name the repair to run: --defense NAME.")
    specs = check_defense_fields(repair_args)
    configs = [d.config for d in build_defenses(specs, stage="repair")]
    configs = [dataclasses.replace(c, seed=data_args.seed) if _unseeded(c, specs) else c for c in configs]
    source = check_saved_model_data(model_args, floor_args, data_args, trigger_args)
    check_output_dir(args.output_dir, args.overwrite)

    from ..arguments import BackdoorSafeTrainingArguments
    from ..hub.cards import is_hub_id, renderer
    from ..hub.run_folder import finish_run, make_readable, read_run_info, start_run
    from ..models import tokenize_dataset

    replace_earlier_run(args.output_dir)
    data = load_data(data_args, source)
    if args.clean_split not in data:
        raise CommandError(f"The dataset has no `{args.clean_split}` split for clean rows (splits: {sorted(data)}).")
    names = label_names(data)
    model, tokenizer = load_saved_classifier(model_args.model, model_args.tokenizer, len(names))
    asr_raw, attack_name = asr_rows(trigger_args, source, data)
    info = start_run(
        args.output_dir,
        "sanitize",
        argv,
        model=model_args.model,
        dataset=source.display_name,
        attack=attack_name,
        defenses=[c.name for c in configs],
    )
    clean = data[args.clean_split].shuffle(seed=data_args.seed)
    clean = clean.select(range(min(args.clean_samples, len(clean))))
    tokenize = lambda split: tokenize_dataset(split, tokenizer, model_args.max_length)  # noqa: E731
    training_args = BackdoorSafeTrainingArguments(
        output_dir=args.output_dir,
        per_device_train_batch_size=model_args.batch_size,
        per_device_eval_batch_size=model_args.batch_size,
        seed=data_args.seed,
        save_strategy="no",
        report_to="none",
    )
    trainer = backdoor_safe_trainer(model, tokenizer, training_args, info["run_id"])
    test = tokenize(data["test"]) if "test" in data else None
    asr = tokenize(asr_raw) if asr_raw is not None else None
    floor = measure_floor(floor_args, model_args, data["test"], asr_raw, len(names)) if test is not None else None
    lines = []
    if test is not None:
        before = with_floor(measure(trainer, test, asr, len(names)), floor)
        trainer.add_backdoor_evaluation(model="before", attack=attack_name, dataset=source.display_name, **before)
        lines += evaluation_lines("before", before, attack_name, floor)
    for config in configs:
        repaired, report = trainer.sanitize(tokenize(clean), config)
        trainer.model = repaired
        lines += renderer(report).console_summary(report)
    if test is not None:
        after = with_floor(measure(trainer, test, asr, len(names)), floor)
        trainer.add_backdoor_evaluation(model="this model", attack=attack_name, dataset=source.display_name, **after)
        lines += evaluation_lines(f"after {' + '.join(c.name for c in configs)}", after, attack_name)
    trainer.save_model(args.output_dir)
    # The repaired model descends from the saved one: name the Hub model it was fine-tuned from, when known.
    base = (read_run_info(model_args.model) or {}).get("base_model") or (
        model_args.model if is_hub_id(model_args.model) else None
    )
    trainer.create_model_card(dataset=source.display_name, finetuned_from=base)
    make_readable(args.output_dir)
    finish_run(args.output_dir, info)
    print("\n".join(lines))
    print(f"repaired model, card and reports (run {info['run_id']}) saved to {args.output_dir}")
    return 0


def _unseeded(config, specs: list[dict]) -> bool:
    """Whether --seed should seed ``config`` (it has a seed field that --defense-kwargs did not set)."""
    spec = next((s for s in specs if s["name"] == config.name), {})
    return "seed" in getattr(config, "__dataclass_fields__", {}) and "seed" not in spec
