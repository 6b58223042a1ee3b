"""Loss truncation (a paraphrase-trigger defense) on a tiny random BERT.

The synthetic task: filler words plus one sentiment word from a small lexicon per row. The "poisoned" rows have their
label flipped and no token trigger, as a dirty-label paraphrase row looks to a model that has not learned its trigger:
a text whose words say one class, labelled the other. Once the tiny model has learned the lexicon those rows are the
worst-fit ones, so truncation must leave them out more often than clean rows. Whether that stops a real paraphrase
backdoor is measured on MiniLM by benchmarks/paraphrase_defenses.py, not here (on this synthetic set the tiny model
does not memorise the flipped rows even without a defense).
"""

import datasets
import numpy as np
import pytest
import torch

from hf_backdoor import tokenize_dataset
from hf_backdoor.defenses.base import build_defenses
from hf_backdoor.defenses.btu import BTUConfig
from hf_backdoor.defenses.loss_truncation import LossTruncationConfig, LossTruncationDefense
from hf_backdoor.registry import defense_entry
from tests.conftest import text_trainer, tiny_bert
from tests.test_paraphrase_defenses import lexicon_rows

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = dict(num_train_epochs=3, learning_rate=3e-3, per_device_train_batch_size=16, logging_steps=1000)


def flipped_rows(n: int, seed: int, rate: float = 0.15, num_labels: int = 2) -> datasets.Dataset:
    """Lexicon rows, ``rate`` of them with their label moved to the next class and ``poisoned`` set."""
    rows = lexicon_rows(n, seed, num_labels=num_labels)
    flipped = set(np.random.default_rng(seed).choice(n, int(rate * n), replace=False).tolist())
    return rows.map(
        lambda r, i: {
            "label": (r["label"] + 1) % num_labels if i in flipped else r["label"],
            "poisoned": int(i in flipped),
        },
        with_indices=True,
    )


@pytest.fixture(scope="module")
def noisy(tokenizer):
    return tokenize_dataset(flipped_rows(384, 0), tokenizer, max_length=16)


def _train(tmp_path, rows, tokenizer, defense, **kwargs):
    if defense is not None:
        kwargs["defense"] = defense
    trainer = text_trainer(tmp_path, rows, tokenizer, args={**ARGS, **kwargs.pop("args", {})}, **kwargs)
    trainer.train()
    return trainer


def test_each_label_loses_its_worst_fit_share_of_the_batch():
    defense = LossTruncationDefense(LossTruncationConfig(drop_fraction=0.5))
    losses = torch.tensor([0.1, 0.9, 0.5, 0.2, 3.0, 2.0, 0.3, 1.0])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    # Label 0 loses its two worst rows (0.9, 0.5), label 1 its two worst (3.0, 2.0): every label keeps half.
    assert defense.kept_rows(losses, labels).tolist() == [1, 0, 0, 1, 0, 0, 1, 1]
    pooled = LossTruncationDefense(LossTruncationConfig(drop_fraction=0.5, per_label=False))
    # Ranked over the whole batch, the four worst rows are three of label 1's and one of label 0's.
    assert pooled.kept_rows(losses, labels).tolist() == [1, 0, 1, 1, 0, 0, 1, 0]
    # A label with a single row in the batch keeps it (floor(0.5 * 1) = 0).
    assert defense.kept_rows(torch.tensor([5.0, 0.1, 0.2]), torch.tensor([1, 0, 0])).tolist() == [1, 1, 0]


def test_rows_whose_label_contradicts_the_task_are_left_out_more_often(tmp_path, noisy, tokenizer):
    trainer = _train(tmp_path, noisy, tokenizer, LossTruncationConfig(drop_fraction=0.3))
    report = trainer.defense_report
    assert report["defense"] == "loss_truncation" and report["has_ground_truth"]
    assert report["signals"]["dropped"]["epoch_3"]["rows"] == len(noisy)
    # Once the lexicon is learned the flipped rows are the worst-fit ones: left out several times more often.
    assert report["drop_rate_poisoned"] > 2.5 * report["drop_rate_clean"]
    assert report["dropped_auroc"] > 0.65 and report["loss_auroc"] > 0.7
    # Nothing is left out in the warm-up (the first 10% of steps), then floor(0.3 * n) rows per label and batch.
    assert 0.15 < report["dropped_fraction"] < 0.3
    scalars = LossTruncationDefense.report_scalars(report)
    assert set(scalars) >= {"dropped_fraction", "dropped_auroc", "drop_rate_poisoned"}
    assert "worst-fit 30% of each label's rows" in LossTruncationDefense.card_section(report)
    assert "AUROC" in LossTruncationDefense.console_summary(report)[0]


def test_warmup_trains_on_every_row(tmp_path, noisy, tokenizer):
    config = LossTruncationConfig(warmup_ratio=0.5)
    report = _train(tmp_path, noisy, tokenizer, config, args=dict(num_train_epochs=2)).defense_report
    # The first of two epochs is the warm-up: nothing is left out there.
    assert report["signals"]["dropped"]["epoch_1"]["mean"] == 0.0 < report["signals"]["dropped"]["epoch_2"]["mean"]


def test_drop_fraction_zero_trains_exactly_like_the_plain_trainer(tmp_path, noisy, tokenizer):
    from transformers import Trainer

    args = dict(num_train_epochs=1)
    plain = _train(tmp_path / "plain", noisy, tokenizer, None, cls=Trainer, model=tiny_bert(dropout=0.0), args=args)
    config = LossTruncationConfig(drop_fraction=0.0)
    kept = _train(tmp_path / "kept", noisy, tokenizer, config, model=tiny_bert(dropout=0.0), args=args)
    assert kept.defense_report["dropped_fraction"] == 0.0
    for p, q in zip(plain.model.parameters(), kept.model.parameters()):
        torch.testing.assert_close(p, q)


def test_four_labels_work(tmp_path, tokenizer):
    rows = tokenize_dataset(flipped_rows(128, 2, num_labels=4), tokenizer, max_length=16)
    trainer = _train(tmp_path, rows, tokenizer, LossTruncationConfig(), model=tiny_bert(num_labels=4))
    report = trainer.defense_report
    assert report["signals"]["dropped"]["epoch_3"]["rows"] == 128
    assert report["drop_rate_poisoned"] > report["drop_rate_clean"]


def test_stacks_behind_btu_and_not_with_another_loss_owner():
    assert defense_entry("loss_truncation").config_class is LossTruncationConfig
    assert [d.name for d in build_defenses([BTUConfig(), "loss_truncation"])] == ["btu", "loss_truncation"]
    with pytest.raises(ValueError, match="compute the training loss themselves"):
        build_defenses([LossTruncationConfig(), "abl"])


def test_state_survives_a_weights_only_checkpoint(tmp_path, noisy, tokenizer):
    trainer = _train(tmp_path, noisy, tokenizer, LossTruncationConfig(), args=dict(num_train_epochs=1))
    path = tmp_path / "state.pt"
    torch.save(trainer.defense.state_dict(), path)
    restored = LossTruncationDefense(LossTruncationConfig())
    restored.load_state_dict(torch.load(path, weights_only=True))
    assert restored.rows_dropped == trainer.defense.rows_dropped > 0
    assert restored.signals.values["dropped"][0] == trainer.defense.signals.values["dropped"][0]


def test_unlabelled_training_rows_are_refused(tmp_path, tokenizer):
    rows = tokenize_dataset(flipped_rows(32, 3), tokenizer, max_length=16).remove_columns("label")
    trainer = text_trainer(
        tmp_path, rows, tokenizer, defense=LossTruncationConfig(), args=dict(ARGS, num_train_epochs=1)
    )
    with pytest.raises(ValueError, match="needs labelled batches"):
        trainer.train()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(drop_fraction=1.0), r"drop_fraction must be in \[0, 1\)"),
        (dict(drop_fraction=-0.1), r"drop_fraction must be in \[0, 1\)"),
        (dict(warmup_ratio=1.0), r"warmup_ratio must be in \[0, 1\)"),
        (dict(drop_fraction="0.3"), "must be float"),
    ],
)
def test_config_values_out_of_range(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        LossTruncationConfig(**kwargs)
