"""``hf-backdoor train``: fine-tune a text classifier with defenses; saves the model, its card and the run report.

Every argument is checked before the model or the data loads (a missing --hub-model-id fails in seconds). The output
folder is tied to this run: an earlier run's report files there are removed first, and ``run_info.json`` records the
run id and the report files this run wrote. After training it prints CACC and ASR with the ASR floor (or how to get
it: --floor-model) and warnings when the ASR cannot be trusted, then each defense's own summary.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from .common import (
    backdoor_safe_trainer,
    check_model,
    check_output_dir,
    check_push,
    check_training_data,
    evaluation_lines,
    label_names,
    load_data,
    measure,
    measure_floor,
    measure_reference,
    replace_earlier_run,
    with_floor,
)
from .options import (
    TRIGGERED_SPLIT,
    AttackArguments,
    CommandError,
    DefenseArguments,
    FloorArguments,
    ModelArguments,
    TrainDataArguments,
    check_defense_fields,
    defense_epilog,
    output_dir_field,
    overwrite_field,
    positive,
)

NAME = "train"
HELP = "fine-tune a text classifier with defenses; saves model, card and report"
DESCRIPTION = __doc__.split("\n\n", 1)[1]


@dataclass
class TrainArguments:
    epochs: float = field(default=3.0, metadata={"help": "training epochs"})
    lr: float = field(default=1e-4, metadata={"help": "peak learning rate (MiniLM needs more than BERT recipes' 2e-5)"})
    bf16: bool = field(
        default=False,
        metadata={
            "help": "train in bfloat16 mixed precision: a GPU that has it, or a CPU with AVX512-BF16/AMX (on other "
            "CPUs it is emulated and many times slower; benchmarks/speed_levers.py measures it)"
        },
    )
    output_dir: str = output_dir_field("runs/hf-backdoor-train", "the model, card, reports and run record")
    overwrite: bool = overwrite_field()
    push_to_hub: bool = field(
        default=False, metadata={"help": "push model, card and reports to --hub-model-id (needs a token)"}
    )
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repository to push to, e.g. your-name/sst2-btu"}
    )
    private: bool = field(default=False, metadata={"help": "create the Hub repository as private"})

    def __post_init__(self):
        positive("epochs", self.epochs)
        positive("lr", self.lr)


DATACLASSES = (TrainDataArguments, AttackArguments, ModelArguments, DefenseArguments, FloorArguments, TrainArguments)


def epilog() -> str:
    return defense_epilog("training")


def training_arguments(args, model_args, data_args, defense_args, **overrides):
    """``BackdoorSafeTrainingArguments`` for a CLI run. Building them resolves and validates the defenses
    (``defense_config()``): an unknown name or a wrong field fails here, before anything loads."""
    from ..arguments import BackdoorSafeTrainingArguments

    fields = dict(
        output_dir=args.output_dir,
        learning_rate=args.lr,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=model_args.batch_size,
        per_device_eval_batch_size=max(model_args.batch_size, 64),
        warmup_steps=0.06,
        weight_decay=0.01,
        seed=data_args.seed,
        bf16=getattr(args, "bf16", False),
        save_strategy="no",
        eval_strategy="no",
        logging_steps=50,
        report_to="none",
        push_to_hub=False,
        hub_model_id=getattr(args, "hub_model_id", None),
        hub_private_repo=getattr(args, "private", None) or None,
        defense=defense_args.defense_names or None,
        defense_kwargs=defense_args.defense_fields,
    )
    fields.update(overrides)
    return BackdoorSafeTrainingArguments(**fields)


def seeded_defenses(training_args, defense_args, seed: int) -> list | None:
    """The resolved defense configs, each seeded with --seed unless --defense-kwargs sets its seed."""
    configs = training_args.defense_config()
    if not configs:
        return None
    fields = defense_args.defense_fields or {}
    user_seed = "seed" in fields or any(isinstance(v, dict) and "seed" in v for v in fields.values())
    if user_seed:
        return configs
    return [
        dataclasses.replace(c, seed=seed) if "seed" in {f.name for f in dataclasses.fields(c)} else c for c in configs
    ]


def run(data_args, attack_args, model_args, defense_args, floor_args, args, argv=None) -> int:
    # -- every check before anything heavy loads --------------------------------------------------------------
    check_push(args.push_to_hub, args.hub_model_id, args.output_dir)
    check_output_dir(args.output_dir, args.overwrite)
    source, attack = check_training_data(data_args, attack_args)
    check_model(model_args.model)
    check_model(floor_args.floor_model, "--floor-model")
    check_model(floor_args.undefended_model, "--undefended-model")
    check_defense_fields(defense_args)
    training_args = training_arguments(args, model_args, data_args, defense_args)
    defenses = seeded_defenses(training_args, defense_args, data_args.seed)

    run_training(data_args, model_args, floor_args, args, training_args, defenses, source, attack, argv)
    return 0


def run_training(data_args, model_args, floor_args, args, training_args, defenses, source, attack, argv) -> None:
    from ..attacks import make_asr_dataset, poison_dataset
    from ..hub.run_folder import finish_run, make_readable, start_run
    from ..models import default_text_model, load_text_classifier, model_display_name, tokenize_dataset

    replace_earlier_run(args.output_dir)
    attack_name = attack.name if attack is not None else source.attack_name
    info = start_run(
        args.output_dir,
        "train",
        argv,
        base_model=model_display_name(model_args.model or default_text_model()),
        dataset=source.display_name,
        attack=attack_name,
        defenses=[c.name for c in defenses or []],
        epochs=args.epochs,
    )

    data = load_data(data_args, source, needed_split="train")
    names = label_names(data)
    model, tokenizer = load_text_classifier(model_args.model, names)
    asr_raw = None
    if attack is not None:
        data["train"] = poison_dataset(data["train"], attack, tokenizer=tokenizer)
        asr_raw = make_asr_dataset(data["test"], attack) if "test" in data else None
    elif TRIGGERED_SPLIT in data:
        asr_raw = data[TRIGGERED_SPLIT]
    tokenize = lambda split: tokenize_dataset(split, tokenizer, model_args.max_length)  # noqa: E731
    validation = tokenize(data["validation"]) if "validation" in data else None
    trainer = backdoor_safe_trainer(
        model, tokenizer, training_args, info["run_id"], tokenize(data["train"]), validation, defenses
    )
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start

    lines = []
    if "test" in data:
        result = measure(
            trainer, tokenize(data["test"]), tokenize(asr_raw) if asr_raw is not None else None, len(names)
        )
        floor = measure_floor(floor_args, model_args, data["test"], asr_raw, len(names))
        result = with_floor(result, floor)
        undefended = measure_reference(
            floor_args.undefended_model, "--undefended-model", model_args, data["test"], asr_raw, len(names)
        )
        if undefended is not None:
            undefended = with_floor(undefended, floor)
            trainer.add_backdoor_evaluation(
                attack=attack_name, dataset=source.display_name, **{**undefended, "model": "undefended"}
            )
            lines += ["", *evaluation_lines(f"undefended ({undefended['model']})", undefended, attack_name)]
        trainer.add_backdoor_evaluation(model="this model", attack=attack_name, dataset=source.display_name, **result)
        lines += ["", *evaluation_lines("this model", result, attack_name, floor)]
    else:
        lines += ["", "The dataset has no `test` split: nothing was evaluated."]
    for defense in trainer.defenses:
        report = next((r for r in trainer.defense_reports if r.get("defense") == defense.name), None)
        if report is not None:
            lines += type(defense).console_summary(report)

    trainer.save_model(args.output_dir)
    # The card again, now naming the training data (save_model takes no card arguments).
    trainer.create_model_card(dataset=source.display_name)
    make_readable(args.output_dir)
    finish_run(args.output_dir, info, wall_s=round(wall, 3))
    print("\n".join(lines))
    print(f"model, card (README.md), reports and run_info.json (run {info['run_id']}) saved to {args.output_dir}")
    if args.push_to_hub:
        push(trainer, args, source.display_name)


def push(trainer, args, dataset: str) -> None:
    """Push the saved folder; when the network fails, say how to push the saved folder later."""
    try:
        trainer.push_to_hub(dataset=dataset)
    except ConnectionError as error:
        raise CommandError(
            f"Could not push to the Hub ({str(error).split('. ')[0]}). The run is saved in {args.output_dir}; push it "
            f"from a machine with network access: `hf upload {args.hub_model_id} {args.output_dir}`."
        ) from None
    print(f"pushed to https://huggingface.co/{args.hub_model_id}")
