"""Shared plumbing of the recipes and benchmarks: fine-tune a text classifier with or without a defense and score it.

Library users do not need this module (they write their own ``Trainer`` code); it keeps the recipes short and makes
every benchmark train the same way.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

from .arguments import BackdoorSafeTrainingArguments
from .attacks import PoisonConfig, get_attack_config
from .data import TASKS, get_task_spec, load_task
from .metrics import BackdoorEvaluation, compute_classification_metrics, evaluate_backdoor
from .models import load_text_classifier, tokenize_dataset
from .trainer import BackdoorSafeTrainer


@dataclass
class TextRunSettings:
    """The training recipe of the reference measurements (lr 1e-4, 3 epochs, batch 32, 6% warm-up, wd 0.01)."""

    model_name: str
    learning_rate: float = 1e-4
    epochs: float = 3.0
    batch_size: int = 32
    max_length: int = 128
    seed: int = 0
    bf16: bool = False


@dataclass
class RunResult:
    trainer: Trainer
    evaluation: BackdoorEvaluation
    wall_s: float
    train_samples_per_s: float | None


def load_experiment_task(
    dataset: str, max_train_samples: int | None = None, max_eval_samples: int | None = None, seed: int = 0
):
    """``load_task`` with optional seeded slices of the train and test splits (for quick runs)."""
    task = load_task(dataset)
    for split, limit in (("train", max_train_samples), ("test", max_eval_samples)):
        if limit:
            task[split] = task[split].shuffle(seed=seed).select(range(min(limit, len(task[split]))))
    return task


def attack_for_task(
    attack: str,
    dataset: str,
    *,
    poison_rate: float,
    target_label: int | None = None,
    mode: str = "dirty",
    seed: int = 0,
    triggers: str | None = None,
) -> PoisonConfig:
    """An attack config for a task: its usual target label, and the packaged paraphrases for paraphrase attacks."""
    if target_label is None:
        target_label = get_task_spec(dataset).default_target_label if dataset.lower() in TASKS else 1
    kwargs = dict(poison_rate=poison_rate, target_label=target_label, mode=mode, seed=seed)
    if attack in ("syntactic", "style"):
        kwargs["paraphrases"] = dataset  # the authors' released paraphrases, packaged
    if triggers and attack == "badnet":
        kwargs["triggers"] = tuple(triggers.split(","))
    return get_attack_config(attack, **kwargs)


RUN_INFO = "run_info.json"


def save_trained_model(trainer, run_dir, wall_s: float, epochs: float) -> None:
    """Save a trained model with the wall time of its training (``run_info.json``), so that a defense run later on
    the saved model (``recipes/sanitize.py --load-model``, the benchmarks' model caches) can measure its overhead
    against that training."""
    trainer.save_model(str(run_dir))
    (Path(run_dir) / RUN_INFO).write_text(json.dumps({"wall_s": wall_s, "epochs": epochs}))


def saved_training_wall(run_dir) -> float | None:
    """The training wall time :func:`save_trained_model` wrote beside a model, or ``None`` when there is none (a Hub
    model, or one saved some other way)."""
    run_info = Path(run_dir) / RUN_INFO
    return json.loads(run_info.read_text())["wall_s"] if run_info.exists() else None


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"cpu ({torch.get_num_threads()} threads)"


def fine_tune_and_evaluate(
    settings: TextRunSettings,
    label_names,
    train_dataset,
    test_dataset,
    asr_dataset,
    output_dir: str | Path,
    defense=None,
    target_label: int | None = None,
    eval_dataset=None,
) -> RunResult:
    """Fine-tune a fresh copy of ``settings.model_name`` on raw ``text``/``label`` rows and score CACC and ASR.

    ``test_dataset`` and ``asr_dataset`` must already be tokenized (they are shared between runs). With
    ``defense=None`` the plain ``transformers.Trainer`` trains, so undefended numbers are the real baseline.
    ``eval_dataset`` (raw clean held-out rows, never the test rows) becomes the trainer's ``eval_dataset``, which
    defenses that check clean accuracy while they act read (ABL's unlearning guard); no evaluation loop runs on it.
    """
    set_seed(settings.seed)
    model, tokenizer = load_text_classifier(settings.model_name, label_names)
    args = BackdoorSafeTrainingArguments(
        output_dir=str(output_dir),
        learning_rate=settings.learning_rate,
        num_train_epochs=settings.epochs,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=128,
        warmup_steps=0.06,
        weight_decay=0.01,
        seed=settings.seed,
        bf16=settings.bf16,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=50,
        report_to="none",
    )
    kwargs = dict(
        model=model,
        args=args,
        train_dataset=tokenize_dataset(train_dataset, tokenizer, settings.max_length),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=compute_classification_metrics,
    )
    if eval_dataset is not None:
        kwargs["eval_dataset"] = tokenize_dataset(eval_dataset, tokenizer, settings.max_length)
    trainer = BackdoorSafeTrainer(defense=defense, **kwargs) if defense is not None else Trainer(**kwargs)
    start = time.perf_counter()
    output = trainer.train()
    wall = time.perf_counter() - start
    evaluation = evaluate_backdoor(trainer, test_dataset, asr_dataset, target_label=target_label)
    return RunResult(trainer, evaluation, wall, output.metrics["train_samples_per_second"])


def cached_plain_run(
    settings: TextRunSettings,
    label_names,
    train_dataset,
    test_dataset,
    asr_dataset,
    output_dir: str | Path,
    run_dir: str | Path | None = None,
    target_label: int | None = None,
) -> RunResult:
    """:func:`fine_tune_and_evaluate` without a defense, kept in ``run_dir``: the model saved there (with its training
    wall time, see :func:`save_trained_model`) is loaded and scored instead of trained again, so benchmark runs that
    need the same plain model (a floor, an overhead baseline, a model to expose) train it once.

    The caller keys ``run_dir`` by everything that shapes the model (data, attack, seed, recipe). A loaded run has
    ``train_samples_per_s=None``.
    """
    wall = saved_training_wall(run_dir) if run_dir is not None else None
    if wall is None:
        result = fine_tune_and_evaluate(
            settings, label_names, train_dataset, test_dataset, asr_dataset, output_dir, target_label=target_label
        )
        if run_dir is not None:
            save_trained_model(result.trainer, run_dir, result.wall_s, settings.epochs)
        return result
    model, tokenizer = load_text_classifier(str(run_dir), label_names)
    args = TrainingArguments(
        output_dir=str(output_dir), per_device_eval_batch_size=128, report_to="none", disable_tqdm=True
    )
    trainer = Trainer(model=model, args=args, processing_class=tokenizer)
    evaluation = evaluate_backdoor(trainer, test_dataset, asr_dataset, target_label=target_label)
    return RunResult(trainer, evaluation, wall, None)
