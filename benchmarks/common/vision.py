"""The small ViT's training and scoring, shared by the image recipes and the vision benchmarks."""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    DefaultDataCollator,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_backdoor.attacks import IMAGE_ATTACKS, get_image_attack_config
from hf_backdoor.metrics import BackdoorEvaluation, attack_success_rate, clean_accuracy, predict_labels
from hf_backdoor.trainer import BackdoorSafeTrainer
from hf_backdoor.vision import (
    describe_default_vit,
    load_image_classifier,
    parse_config_overrides,
    prepare_image_dataset,
    record_training_augmentation,
    recorded_training_augmentation,
)

from .records import device_name, shown
from .runs import REFERENCE_RUN_DEFAULTS, save_trained_model, saved_training_wall

# The reference ViT recipe: AdamW lr 1e-3, weight decay 0.05, label smoothing 0.1, batch 128, 10% warm-up then cosine
# decay, 60 epochs, seed 0; random crop (reflect pad 4) and flip come with `prepare_image_dataset(train=True)`.
VIT_TRAINING_DEFAULTS = dict(
    learning_rate=1e-3,
    num_train_epochs=60.0,
    weight_decay=0.05,
    label_smoothing_factor=0.1,
    per_device_train_batch_size=128,
    per_device_eval_batch_size=512,
    lr_scheduler_type="cosine",
    warmup_steps=0.1,
    **REFERENCE_RUN_DEFAULTS,
    remove_unused_columns=False,  # the image transform reads the image column
    disable_tqdm=True,
)


@dataclass
class ImageRecipeArguments:
    """The data, attack and model flags every image recipe takes; a recipe's ``ScriptArguments`` adds its own."""

    dataset: str = field(
        default="cifar10",
        metadata={"help": "cifar10 (the packaged subset), an .npz path, a Hub id or an image folder."},
    )
    attack: str = field(default="badnet", metadata={"help": "Image attack.", "choices": sorted(IMAGE_ATTACKS)})
    poison_rate: float = field(default=0.1, metadata={"help": "Share of the training rows poisoned."})
    target_label: int = field(default=0, metadata={"help": "Target label."})
    attack_kwargs: str | None = field(
        default=None,
        metadata={"help": 'The attack config\'s other fields as JSON, e.g. \'{"s": 1.0, "cross_ratio": 0}\' (WaNet).'},
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Hub ViT/DeiT id or local path (None: the default small ViT)."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "ViTConfig fields of the default small ViT, e.g. 'patch_size=8', or a preset first: 'cpu'."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Seeded slice of the training split."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Seeded slice of the test split."})
    crop_padding: int = field(
        default=4,
        metadata={
            "help": "Random-crop reflect padding of the ViT's training and of the repairs' augmentation (0: flip "
            "only; a corner trigger then stays put). With the crop the `cpu` preset learns BadNets too late "
            "for ABL's isolation, which then misses; with 0 ABL met its bar on it (README, 'ABL on the cpu preset'). "
            "A model hf-backdoor trained keeps its own on its config (`hf_backdoor_training_augmentation`), "
            "which a model read from disk is then repaired and exposed with; give it for a model without one."
        },
    )

    @property
    def attack_kwargs_text(self) -> str | None:
        """``--attack_kwargs`` as sorted JSON text, the form records carry (``None`` when not given)."""
        return json.dumps(json.loads(self.attack_kwargs), sort_keys=True) if self.attack_kwargs else None

    def attack_config(self, seed: int):
        """The attack these flags name, seeded by ``seed``; a field of ``--attack_kwargs`` that the attack's config
        does not have is an error that names the attack."""
        fields = json.loads(self.attack_kwargs) if self.attack_kwargs else {}
        if not isinstance(fields, dict):
            raise SystemExit(f"--attack_kwargs must be a JSON object, got {self.attack_kwargs!r}.")
        try:
            return get_image_attack_config(
                self.attack, poison_rate=self.poison_rate, target_label=self.target_label, seed=seed, **fields
            )
        except TypeError as err:
            raise SystemExit(
                f"--attack_kwargs {self.attack_kwargs!r} does not fit the {self.attack} attack: {err}"
            ) from err


def vit_name(model: str | None, config_overrides: str | None) -> str:
    """The model a record names: the Hub id or path given, else the default small ViT with its overrides."""
    overrides = parse_config_overrides(config_overrides)
    if overrides and model:
        raise SystemExit("--config_overrides changes the default small ViT; it cannot be combined with --model.")
    return model or describe_default_vit(**overrides)


def train_vit(
    training_args: TrainingArguments,
    train_rows,
    label_names,
    *,
    model: str | None = None,
    config_overrides: str | None = None,
    crop_padding: int = 4,
    defense=None,
    eval_dataset=None,
) -> tuple[Trainer, float]:
    """Train a fresh model (``model``, or the default small ViT with ``config_overrides``) on raw ``image``/``label``
    rows, seeded by ``training_args.seed``; returns the trainer and the wall time of ``train()``. With a ``defense``
    config ``BackdoorSafeTrainer`` trains, else the plain ``Trainer``. With raw ``eval_dataset`` rows the Trainer
    logs their accuracy (``eval_accuracy``) as ``training_args.eval_strategy`` says."""
    vit_name(model, config_overrides)  # rejects --model with --config_overrides before any work
    set_seed(training_args.seed)
    vit, processor = load_image_classifier(model, label_names=label_names, **parse_config_overrides(config_overrides))
    train = prepare_image_dataset(
        train_rows, processor, train=True, keep_row_index=defense is not None, crop_padding=crop_padding
    )
    kwargs = dict(
        model=vit,
        args=training_args,
        train_dataset=train,
        processing_class=processor,
        data_collator=DefaultDataCollator(),
    )
    if eval_dataset is not None:
        kwargs["eval_dataset"] = prepare_image_dataset(eval_dataset, processor)
        kwargs["compute_metrics"] = _accuracy
    trainer = BackdoorSafeTrainer(defense=defense, **kwargs) if defense is not None else Trainer(**kwargs)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    record_training_augmentation(trainer.model, train)  # BackdoorSafeTrainer does it itself; the plain one does not
    return trainer, wall


def _accuracy(prediction) -> dict[str, float]:
    return {"accuracy": float((np.argmax(prediction.predictions, axis=-1) == prediction.label_ids).mean())}


def train_recipe_vit(script, training_args: TrainingArguments, run_dir, rows, label_names, defense=None, save=True):
    """:func:`train_vit` with the model flags of ``recipes/cifar10_vit.py`` (``script``: the model, its config
    overrides and the crop padding), writing to ``run_dir``; with ``save`` the model is saved there with its training
    wall time, for :func:`load_saved_vit` to reuse."""
    trainer, wall = train_vit(
        dataclasses.replace(training_args, output_dir=str(run_dir)),
        rows,
        label_names,
        model=script.model_name_or_path,
        config_overrides=script.config_overrides,
        crop_padding=script.crop_padding,
        defense=defense,
    )
    if save:
        save_trained_model(trainer, run_dir, wall, training_args.num_train_epochs)
    return trainer, wall


def load_saved_vit(run_dir, training_args: TrainingArguments | None = None) -> tuple[Trainer, float | None] | None:
    """A trainer around the image model saved in ``run_dir`` (by ``save_trained_model``) and its training wall time
    (``None`` when the folder has no ``run_info.json``), or ``None`` when no model was saved there."""
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").exists():
        return None
    model = AutoModelForImageClassification.from_pretrained(run_dir)
    processor = AutoImageProcessor.from_pretrained(run_dir)
    args = training_args or TrainingArguments(output_dir=str(run_dir / "eval"), **VIT_TRAINING_DEFAULTS)
    return Trainer(model=model, args=args, processing_class=processor), saved_training_wall(run_dir)


def repair_rows(trainer, clean, crop_padding: int):
    """The clean rows to hand a repair, and the crop padding they will be augmented with. A model that records its
    training augmentation (``BackdoorSafeTrainer`` and ``train_vit`` write it) gets the raw rows, which the defense
    prepares through that record; an older model without it gets rows prepared with ``crop_padding`` (the flag)."""
    recorded = recorded_training_augmentation(trainer.model)
    if recorded:
        return clean, recorded["crop_padding"]
    return prepare_image_dataset(clean, trainer.processing_class, crop_padding=crop_padding), crop_padding


def evaluate_images(trainer, test, asr_set, target: int) -> BackdoorEvaluation:
    """CACC and ASR on raw image rows (prepared here; labels are read without running the image transform)."""
    processor = trainer.processing_class
    labels = np.asarray(test.with_format(None)["label"])
    return BackdoorEvaluation(
        cacc=clean_accuracy(predict_labels(trainer, prepare_image_dataset(test, processor)), labels),
        asr=attack_success_rate(predict_labels(trainer, prepare_image_dataset(asr_set, processor)), target),
        num_clean=len(test),
        num_asr=len(asr_set),
    )


def abl_fields(report: dict, wall: float, epochs: float) -> dict:
    """An ABL run's record fields: its isolation against the poisoned rows, the isolated rows' accuracy before and
    after unlearning, its config, and its own work (the isolation scoring pass and the unlearning; its LGA epochs
    cost what plain epochs do) in seconds and in epochs of this run, which unlike the whole-run ratios does not depend
    on what else shared the machine during the plain run."""
    isolation, unlearning = report["isolation"], report["unlearning"] or [{}]
    phases_s = sum(report["timings_s"].values())
    return {
        "abl_isolation_precision": isolation.get("precision"),
        "abl_isolation_recall": isolation.get("recall"),
        "abl_loss_auroc": isolation.get("loss_auroc"),
        "abl_isolated": report["num_isolated_rows"],
        "abl_isolated_accuracy_before_unlearning": unlearning[0].get("isolated_accuracy"),
        "abl_isolated_accuracy_after_unlearning": unlearning[-1].get("isolated_accuracy"),
        "abl_config": json.dumps({k: v for k, v in report["config"].items() if k != "name"}),
        "abl_phases_s": round(phases_s, 2),
        "abl_phases_epochs": round(phases_s / (wall / epochs), 3),
    }


def print_runs(records: list[dict]) -> None:
    """The image recipe's table: CACC, ASR, floor, wall time, ABL's overhead and isolation precision/recall."""
    print(f"\n{'run':<12}{'attack':<9}{'CACC':>7}{'ASR':>7}{'floor':>7}{'wall s':>9}{'overhead':>9}  isolation P/R")
    for r in records:
        floor = shown(r["asr_floor"])
        overhead = shown(r["overhead"], ".2f", "x")
        isolation = (
            f"{r['abl_isolation_precision']:.2f}/{r['abl_isolation_recall']:.2f}"
            if r.get("abl_isolation_precision") is not None
            else ""
        )
        print(
            f"{r['run']:<12}{r['attack']:<9}{r['cacc']:>7.3f}{r['asr']:>7.3f}{floor:>7}{r['wall_s']:>9.1f}"
            f"{overhead:>9}  {isolation}"
        )
    print(f"device: {device_name()}")
