"""Training runs the recipes and benchmarks share: the reference text training, seeded data slices, the defense a
recipe's arguments name, and saved models that remember how long they took to train."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

from hf_backdoor.arguments import BackdoorSafeTrainingArguments
from hf_backdoor.attacks import ATTACKS
from hf_backdoor.data import TASKS
from hf_backdoor.metrics import BackdoorEvaluation, compute_classification_metrics, evaluate_backdoor
from hf_backdoor.models import load_text_classifier, tokenize_dataset
from hf_backdoor.registry import defense_entry
from hf_backdoor.trainer import BackdoorSafeTrainer

# What every reference training (text and ViT) shares: seed 0, no checkpoints and no evaluation loop (the scripts score
# CACC and ASR themselves), a log line every 50 steps, no reporting integration.
REFERENCE_RUN_DEFAULTS = dict(seed=0, save_strategy="no", eval_strategy="no", logging_steps=50, report_to="none")

# The text training of every reference measurement: AdamW lr 1e-4 (MiniLM was trained as a sentence encoder and needs
# a higher rate than BERT recipes' 2e-5), 3 epochs, batch 32, 6% warm-up, weight decay 0.01, seed 0. The recipes show
# these as their defaults; `text_training_args` builds them for the benchmarks.
TEXT_TRAINING_DEFAULTS = dict(
    learning_rate=1e-4,
    num_train_epochs=3.0,
    per_device_train_batch_size=32,
    per_device_eval_batch_size=128,
    warmup_steps=0.06,
    weight_decay=0.01,
    **REFERENCE_RUN_DEFAULTS,
)


@dataclass
class TextRecipeArguments:
    """The data, attack and model flags every text recipe takes; a recipe's ``ScriptArguments`` adds its own."""

    dataset: str = field(
        default="sst2", metadata={"help": f"Packaged task ({', '.join(TASKS)}), Hub id or local path."}
    )
    attack: str = field(default="badnet", metadata={"help": "Attack.", "choices": sorted(ATTACKS)})
    poison_rate: float = field(default=0.1, metadata={"help": "Share of the training rows poisoned."})
    target_label: int | None = field(default=None, metadata={"help": "Target label (None: the task's usual one)."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub id or local path (None: the packaged MiniLM-L6)."}
    )
    max_length: int = field(default=128, metadata={"help": "Tokens per row."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Seeded slice of the training split."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Seeded slice of the test split."})


# The ABL unlearning fields the benchmarks expose as --abl-unlearning-* flags; unset flags keep ABL's defaults.
ABL_UNLEARNING_FIELDS = (
    "unlearning_epochs",
    "unlearning_stop_accuracy",
    "unlearning_objective",
    "unlearning_guard_drop",
)


def add_abl_arguments(parser, objective_help: str, guard_drop: bool = False) -> None:
    """The ABL flags the text and vision benchmarks share: the LGA form and the unlearning fields (``--abl-unlearning-
    guard-drop`` only where the benchmark holds clean validation rows for the guard)."""
    parser.add_argument("--abl-lga", default="per_example", choices=["per_example", "batch", "none"])
    parser.add_argument("--abl-unlearning-epochs", type=int, default=None, help="ABL ascent epochs (default: ABL's)")
    parser.add_argument(
        "--abl-unlearning-stop-accuracy",
        type=float,
        default=None,
        help="end ABL's ascent once the isolated rows' accuracy is at or below this (default: none)",
    )
    parser.add_argument(
        "--abl-unlearning-objective",
        default=None,
        choices=["ascent", "ascent_descent", "complementary"],
        help=objective_help,
    )
    if guard_drop:
        parser.add_argument(
            "--abl-unlearning-guard-drop",
            type=float,
            default=None,
            help="undo an unlearning step that costs the clean validation rows more than this much accuracy and "
            "halve the learning rate (default: no guard, as the paper)",
        )


def abl_unlearning_fields(args) -> dict:
    """The ABL unlearning fields the --abl-unlearning-* flags set (those left unset are left out)."""
    values = {name: getattr(args, f"abl_{name}", None) for name in ABL_UNLEARNING_FIELDS}
    return {name: value for name, value in values.items() if value is not None}


def selected_runs(runs: str, choices: tuple[str, ...]) -> list[str]:
    """The runs a recipe's comma-separated ``--runs`` names, in its order; exits when it names none or others."""
    names = [r.strip() for r in runs.split(",") if r.strip()]
    if not names or set(names) - set(choices):
        raise SystemExit(f"--runs must list some of {choices}, got {runs!r}")
    return names


def text_training_args(output_dir: str | Path, **overrides) -> BackdoorSafeTrainingArguments:
    """The reference text training (``TEXT_TRAINING_DEFAULTS``) with ``overrides``, writing to ``output_dir``."""
    return BackdoorSafeTrainingArguments(output_dir=str(output_dir), **{**TEXT_TRAINING_DEFAULTS, **overrides})


def limit_splits(task, max_train_samples: int | None, max_eval_samples: int | None, seed: int):
    """``task`` with seeded random slices of its train and test splits (for quick runs); other splits are kept."""
    for split, limit in (("train", max_train_samples), ("test", max_eval_samples)):
        if limit:
            task[split] = task[split].shuffle(seed=seed).select(range(min(limit, len(task[split]))))
    return task


def unpoisoned_rows(poisoned_dataset) -> np.ndarray:
    """Positions of the rows a poisoner left untouched (its ``poisoned`` column is 0)."""
    return np.flatnonzero(~np.asarray(poisoned_dataset.with_format(None)["poisoned"], dtype=bool))


def recipe_defense(training_args: BackdoorSafeTrainingArguments, defaults: dict | None = None):
    """The one training-stage defense config that ``--defense NAME`` and ``--defense_kwargs`` describe.

    Its fields are, by priority: ``--defense_kwargs`` (flat, or keyed by the defense's name), then the recipe's
    ``defaults``, then the config's own defaults; its ``seed`` is the training ``--seed`` unless ``--defense_kwargs``
    gives one, so one seed reproduces the whole run.
    """
    names = training_args.defense or []
    if len(names) != 1:
        raise SystemExit(f"This recipe runs exactly one defense; --defense gave {names or 'none'}.")
    name = names[0]
    kwargs = dict(training_args.defense_kwargs or {})
    if isinstance(kwargs.get(name), dict):
        kwargs = kwargs[name]
    config_class = defense_entry(name).config_class
    fields = {**(defaults or {}), **kwargs}
    if "seed" in {f.name for f in dataclasses.fields(config_class)}:
        fields.setdefault("seed", training_args.seed)
    return config_class(**fields)


@dataclass
class RunResult:
    trainer: Trainer
    evaluation: BackdoorEvaluation
    wall_s: float
    train_samples_per_s: float | None


def fine_tune_and_evaluate(
    training_args: TrainingArguments,
    model_name: str,
    label_names,
    train_dataset,
    test_dataset,
    asr_dataset,
    *,
    max_length: int = 128,
    defense=None,
    target_label: int | None = None,
    eval_dataset=None,
    run_dir: str | Path | None = None,
) -> RunResult:
    """Fine-tune a fresh copy of ``model_name`` on raw ``text``/``label`` rows and score CACC and ASR.

    ``test_dataset`` and ``asr_dataset`` must already be tokenized (they are shared between runs). With
    ``defense=None`` the plain ``transformers.Trainer`` trains, so undefended numbers are the real baseline (a
    ``defense`` named in ``training_args`` is ignored then). ``eval_dataset`` (raw clean held-out rows, never the test
    rows) becomes the trainer's ``eval_dataset``, which defenses that check clean accuracy while they act read (ABL's
    unlearning guard); no evaluation loop runs on it.

    ``run_dir`` (plain runs only) keeps the model: one saved there before (with its training wall time, see
    :func:`save_trained_model`) is loaded and scored instead of trained again, so benchmark runs that need the same
    plain model (a floor, an overhead baseline, a model to expose) train it once. The caller keys ``run_dir`` by
    everything that shapes the model (data, attack, seed, training). A loaded run has ``train_samples_per_s=None``.
    """
    if run_dir is not None:
        if defense is not None:
            raise ValueError("run_dir keeps plain models only: a defended run is always trained.")
        wall = saved_training_wall(run_dir)
        if wall is not None:
            return _saved_plain_run(run_dir, training_args, label_names, test_dataset, asr_dataset, target_label, wall)
    set_seed(training_args.seed)
    model, tokenizer = load_text_classifier(model_name, label_names)
    kwargs = dict(
        model=model,
        args=training_args,
        train_dataset=tokenize_dataset(train_dataset, tokenizer, max_length),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_classification_metrics,
    )
    if eval_dataset is not None:
        kwargs["eval_dataset"] = tokenize_dataset(eval_dataset, tokenizer, max_length)
    trainer = BackdoorSafeTrainer(defense=defense, **kwargs) if defense is not None else Trainer(**kwargs)
    start = time.perf_counter()
    output = trainer.train()
    wall = time.perf_counter() - start
    evaluation = evaluate_backdoor(trainer, test_dataset, asr_dataset, target_label=target_label)
    if run_dir is not None:
        save_trained_model(trainer, run_dir, wall, training_args.num_train_epochs)
    return RunResult(trainer, evaluation, wall, output.metrics["train_samples_per_second"])


def _saved_plain_run(run_dir, training_args, label_names, test_dataset, asr_dataset, target_label, wall) -> RunResult:
    """The plain model :func:`fine_tune_and_evaluate` saved in ``run_dir``, scored again."""
    model, tokenizer = load_text_classifier(str(run_dir), label_names)
    args = TrainingArguments(
        output_dir=training_args.output_dir, per_device_eval_batch_size=128, report_to="none", disable_tqdm=True
    )
    trainer = Trainer(model=model, args=args, processing_class=tokenizer)
    evaluation = evaluate_backdoor(trainer, test_dataset, asr_dataset, target_label=target_label)
    return RunResult(trainer, evaluation, wall, None)


RUN_INFO = "run_info.json"


def save_trained_model(trainer, run_dir, wall_s: float, epochs: float) -> None:
    """Save a trained model with the wall time of its training (``run_info.json``), so that a defense run later on
    the saved model (the sanitize recipes' ``--load_model``, the benchmarks' model caches) can measure its overhead
    against that training."""
    trainer.save_model(str(run_dir))
    (Path(run_dir) / RUN_INFO).write_text(json.dumps({"wall_s": wall_s, "epochs": epochs}))


def _saved_run_info(run_dir) -> dict | None:
    """What :func:`save_trained_model` wrote beside a model, or ``None`` when it wrote nothing there (a Hub model, or
    one saved some other way)."""
    run_info = Path(run_dir) / RUN_INFO
    return json.loads(run_info.read_text()) if run_info.exists() else None


def saved_training_wall(run_dir) -> float | None:
    """The training wall time :func:`save_trained_model` wrote beside a model, or ``None`` when there is none."""
    info = _saved_run_info(run_dir)
    return info["wall_s"] if info is not None else None


def saved_training_epochs(run_dir) -> float | None:
    """The training epochs :func:`save_trained_model` wrote beside a model, or ``None`` when there are none: two
    models of one shape trained for different schedules are different models, and their records must say which."""
    info = _saved_run_info(run_dir)
    return info.get("epochs") if info is not None else None


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
