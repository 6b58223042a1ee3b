"""CUL / random-label exposure (EBYD) on tiny backdoored models trained on real rows, and its bad inputs."""

import json
import logging

import numpy as np
import pytest
import torch
from transformers import (
    DefaultDataCollator,
)

from hf_backdoor import BadNetConfig, make_asr_dataset, poison_dataset, tokenize_dataset
from hf_backdoor.attacks.vision import ImageBadNetsConfig
from hf_backdoor.defenses import (
    DefenseConfig,
    ExposeConfig,
    ExposeDefense,
    RNPConfig,
    detection_threshold,
    expose_model,
)
from hf_backdoor.defenses.base import defense_class_for_report
from hf_backdoor.defenses.exposure import concentration
from hf_backdoor.metrics import roc_auc
from hf_backdoor.registry import defense_entry
from hf_backdoor.trainer import BackdoorSafeTrainer
from hf_backdoor.vision import default_image_processor, prepare_image_dataset
from tests.conftest import text_trainer, tiny_cifar_vit, training_args

TARGET = 0


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clean_images(cifar):
    # 12 test images of every class: a small, complete clean set (EBYD uses 1% of the training data).
    labels = np.asarray(cifar["test"]["label"])
    rows = np.concatenate([np.flatnonzero(labels == c)[:12] for c in range(10)])
    return cifar["test"].select(sorted(rows.tolist()))


@pytest.fixture(scope="module")
def backdoored_vit(cifar, tmp_path_factory):
    # A large patch at a 20% rate: a trigger a tiny ViT learns in a few hundred steps.
    attack = ImageBadNetsConfig(poison_rate=0.2, target_label=TARGET, patch_size=10)
    rows = poison_dataset(cifar["train"].select(range(256)), attack)
    processor = default_image_processor()
    trainer = BackdoorSafeTrainer(
        model=tiny_cifar_vit(),
        args=training_args(
            tmp_path_factory.mktemp("vit"),
            num_train_epochs=10,
            per_device_train_batch_size=16,
            learning_rate=3e-3,
            logging_steps=1000,
            remove_unused_columns=False,
        ),
        train_dataset=prepare_image_dataset(rows, processor),
        processing_class=processor,
        data_collator=DefaultDataCollator(),
    )
    trainer.train()
    asr_set = prepare_image_dataset(make_asr_dataset(cifar["test"].select(range(200)), attack), processor)
    trainer.asr = trainer.evaluate_backdoor(prepare_image_dataset(cifar["test"], processor), asr_set)
    trainer.poisoned_rows = rows
    return trainer


def test_cul_exposes_the_backdoor_label_of_a_backdoored_vit(backdoored_vit, clean_images):
    trainer = backdoored_vit
    assert trainer.asr["asr"] > 0.8, trainer.asr  # the backdoor is there to be exposed
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    result = trainer.expose(clean_images, ExposeConfig(learning_rate=1e-3, epochs=10))
    assert result.backdoor_label == TARGET, result.to_dict()
    assert result.exposed and result.clean_accuracy_after <= 0.1
    # Trained through the training augmentation, as the official code's clean rows are (transform_train).
    assert result.augmentation == "random crop (reflect padding 4) and horizontal flip"
    assert "trained through random crop" in ExposeDefense.card_section(result.report())
    assert result.label_shares[TARGET] == max(result.label_shares)
    assert result.score == pytest.approx(concentration(np.asarray(result.label_shares)))
    assert result.history[0]["epoch"] == 0 and result.history[-1]["clean_accuracy"] == result.clean_accuracy_after
    # The original model is untouched; the exposed one is a different object with different weights.
    assert all(torch.equal(before[k], v) for k, v in trainer.model.state_dict().items())
    assert result.model is not trainer.model
    # Per-row scores for removal: the exposed model still fits the poisoned rows' labels, not the clean rows'.
    truth = np.asarray(trainer.poisoned_rows["poisoned"])
    assert roc_auc(result.score_rows(trainer.poisoned_rows), truth) > 0.8
    assert result.score_rows(trainer.poisoned_rows, by="backdoor").shape == truth.shape


def test_random_label_exposure_and_unexposable_warning(backdoored_vit, clean_images, caplog):
    caplog.set_level(logging.WARNING, logger="hf_backdoor")
    result = backdoored_vit.expose(
        clean_images, ExposeConfig(method="random_label", learning_rate=1e-3, epochs=3, escalate=0, early_stop=False)
    )
    assert result.method == "random_label" and len(result.history) == 4
    stored = backdoored_vit.expose(clean_images, ExposeConfig(epochs=1, escalate=0, augment=False))
    assert stored.augmentation is None and "trained through" not in ExposeDefense.card_section(stored.report())
    # Raw images get the augmentation the model was trained through: without the random crop, only the flip.
    processor = backdoored_vit.processing_class
    flip_trained = BackdoorSafeTrainer(
        model=backdoored_vit.model,
        args=backdoored_vit.args,
        train_dataset=prepare_image_dataset(backdoored_vit.poisoned_rows, processor, train=True, crop_padding=0),
        processing_class=processor,
        data_collator=DefaultDataCollator(),
    )
    flipped = expose_model(flip_trained, clean_images, ExposeConfig(epochs=1, escalate=0))
    assert flipped.augmentation == "horizontal flip", flipped.augmentation
    stuck = backdoored_vit.expose(clean_images, ExposeConfig(learning_rate=1e-9, epochs=1, escalate=0))
    assert not stuck.exposed
    assert "did not expose the model: clean accuracy went from" in caplog.text
    assert f"{stuck.clean_accuracy_before:.3f} to only {stuck.clean_accuracy_after:.3f}" in caplog.text


def test_bad_clean_sets_raise_with_numbers(backdoored_vit, clean_images):
    labels = np.asarray(clean_images["label"])
    missing = clean_images.select(np.flatnonzero(labels != 7))
    with pytest.raises(ValueError, match=r"class\(es\) \[7\] \(rows per class: 0: 12, .*7: 0"):
        backdoored_vit.expose(missing)
    with pytest.raises(ValueError, match="The clean set has 5 rows; exposure needs at least 10"):
        backdoored_vit.expose(clean_images.select(range(5)))
    with pytest.raises(ValueError, match="method must be one of"):
        ExposeConfig(method="ascent")
    with pytest.raises(ValueError, match="at least 2 clean models"):
        detection_threshold([0.1])
    assert detection_threshold([0.1, 0.3, 0.2]) == pytest.approx(0.3)


def test_concentration_score():
    assert concentration(np.full(10, 0.1)) == pytest.approx(0.0)
    assert concentration(np.eye(10)[3]) == pytest.approx(1.0)
    assert concentration(np.array([0.5, 0.5])) == pytest.approx(0.0)


def test_cul_runs_on_a_text_model_with_raw_clean_text(sst2, tokenizer, tmp_path):
    rows = poison_dataset(sst2["train"].select(range(256)), BadNetConfig(triggers=("cf",), poison_rate=0.1))
    trainer = text_trainer(
        tmp_path,
        tokenize_dataset(rows, tokenizer, max_length=48),
        tokenizer,
        args={"num_train_epochs": 1, "learning_rate": 2e-3, "logging_steps": 1000},
    )
    trainer.train()
    clean = sst2["validation"].select(range(64))  # raw text: tokenized by the exposure with the trainer's tokenizer
    result = expose_model(trainer, clean, ExposeConfig(learning_rate=1e-3, epochs=3, escalate=0, early_stop=False))
    assert len(result.history) == 4 and result.num_clean_rows == 64 and result.augmentation is None  # text
    assert result.backdoor_label in (0, 1) and 0.0 <= result.score <= 1.0
    assert result.to_dict()["config"]["learning_rate"] == 1e-3
    assert result.score_rows(clean).shape == (64,)


def test_rnp_unlearning_exposure_stops_at_the_first_step_below_rnps_threshold(backdoored_vit, clean_images):
    # The tiny ViT scores only 0.16 on the clean rows, under RNP's 0.20 already: stop at chance instead.
    config = ExposeConfig(method="rnp_unlearning", batch_size=16, stop_accuracy=0.1)  # 8 steps an epoch, 120 rows
    result = backdoored_vit.expose(clean_images, config)
    assert result.method == "rnp_unlearning" and result.learning_rate == 0.01  # RNP's SGD rate, not escalated
    assert result.backdoor_label == TARGET, result.to_dict()
    assert result.exposed and result.clean_accuracy_after <= 0.1 < result.clean_accuracy_before
    assert ExposeConfig(method="rnp_unlearning").stop_every_step and not ExposeConfig().stop_every_step
    per_epoch = backdoored_vit.expose(
        clean_images, ExposeConfig.paper("rnp_unlearning", batch_size=16, stop_accuracy=0.1)
    )
    assert per_epoch.history[-1]["step"] % 8 == 0  # the official check: after whole epochs only
    # the per-step check stops at the step that gets there, never later than the epoch-end check
    assert result.history[-1]["step"] <= per_epoch.history[-1]["step"]
    assert result.history[-1]["step"] % 8 != 0 or result.history[-1]["step"] == per_epoch.history[-1]["step"]
    with pytest.raises(ValueError, match="momentum must be in"):
        ExposeConfig(method="rnp_unlearning", momentum=1.0)


def test_exposure_is_the_registered_repair_stage_defense_expose(backdoored_vit, clean_images, tmp_path):
    assert defense_entry("expose") == (ExposeConfig, ExposeDefense) and ExposeDefense.stage == "repair"
    assert isinstance(ExposeConfig(method="random_label"), DefenseConfig)
    assert all(ExposeConfig.field_help().values())
    before = {k: v.clone() for k, v in backdoored_vit.model.state_dict().items()}
    # The fields as a dict (e.g. a saved report's config, name included) work as well as an ExposeConfig.
    fields = {"name": "expose", "method": "random_label", "epochs": 1, "escalate": 0, "learning_rate": 1e-3}
    result = backdoored_vit.expose(clean_images, fields)
    assert result.config == ExposeConfig(**{k: v for k, v in fields.items() if k != "name"}).to_dict()
    assert all(torch.equal(before[k], v) for k, v in backdoored_vit.model.state_dict().items())

    report = json.loads(json.dumps(result.report()))  # what a saved defense report holds
    assert report["defense"] == "expose" and report["config"]["method"] == "random_label"
    assert {k: report[k] for k in ("score", "backdoor_label", "exposed")} == {
        "score": result.score,
        "backdoor_label": result.backdoor_label,
        "exposed": result.exposed,
    }
    defense_class = defense_class_for_report(report)
    assert defense_class is ExposeDefense
    section = defense_class.card_section(report)
    assert "Exposure by fine-tuning on random labels on 120 clean rows" in section
    assert (f"predicts class **{result.backdoor_label}**" in section) == result.exposed
    assert ("**Not exposed**" in section) != result.exposed
    assert any("calibrated on models known to be clean" in line for line in defense_class.card_limits(report))
    assert defense_class.console_summary(report)[0].startswith("EXPOSE (random_label): clean accuracy")
    assert defense_class.report_scalars(report)["score"] == result.score
    figures = defense_class.figures(report, tmp_path)
    assert [f.path for f in figures] == ["figures/exposure.png"] and (tmp_path / "figures/exposure.png").exists()

    # Exposure returns a copy, so it is not a repair trainer.sanitize runs; and expose runs nothing else.
    with pytest.raises(ValueError, match=r"call `trainer.expose\(clean_dataset, ExposeConfig"):
        backdoored_vit.sanitize(clean_images, ExposeConfig())
    with pytest.raises(TypeError, match="config must be an ExposeConfig"):
        expose_model(backdoored_vit, clean_images, RNPConfig())
