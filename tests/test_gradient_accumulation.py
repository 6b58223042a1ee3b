"""Gradient accumulation does not change a defended training step: 4 accumulated micro-batches of 8 rows give the
parameter update of one batch of 32, with no defense, with BTU masking its isolated rows and with ABL's LGA loss.

The trainer owns the scaling: a defense's ``compute_loss`` returns a mean over its micro-batch, and the trainer
divides it by the accumulation steps (``loss_is_scaled_for_ga=False``), as ``Trainer`` does with its own loss. One
optimizer step of plain SGD (no momentum, weight decay, clipping or schedule) on a tiny BERT without dropout, over
the same 32 rows in the same order (``train_sampling_strategy="sequential"``), so the two updates may differ only
by float rounding.

Masking isolated rows (BTU ``isolated_rows="mask"``, ABL's default) averages over the rows each micro-batch keeps,
as the official ABL code trains on the kept rows only; the test isolates as many rows in every micro-batch, where
that mean equals the full batch's. Isolated rows spread unevenly over the micro-batches weigh the kept rows of a
fuller micro-batch slightly less.
"""

import pytest
import torch

from hf_backdoor.defenses import ABLConfig, BTUConfig
from tests.conftest import text_trainer, tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = 32
# Two isolated rows in each micro-batch of 8 (rows are read in order).
EVEN_ISOLATED = [0, 1, 8, 9, 16, 17, 24, 25]


@pytest.fixture(scope="module")
def rows(tiny_train):
    return tiny_train.select(range(ROWS))


def _model():
    model = tiny_bert(dropout=0.0)
    with torch.no_grad():
        # p(label 1) = 0.88 on every row: label-1 rows have a cross-entropy below ABL's gamma = 0.5 and label-0 rows
        # one above it, so LGA ascends on some rows and descends on others within every batch.
        model.classifier.weight.mul_(0.01)
        model.classifier.bias.copy_(torch.tensor([0.0, 2.0]))
    return model


def _btu_after_detection(isolated):
    """BTU as it stands once detection is done: the trigger "cf" flagged and ``isolated`` masked out of the loss."""

    def prepare(trainer):
        cf = trainer.processing_class.convert_tokens_to_ids("cf")
        trainer.defense.load_state_dict(
            {
                "flagged": [cf],
                "candidates": [cf],
                "isolated_row_indices": list(isolated),
                "isolated_row_labels": [0] * len(isolated),
                "detection_done": True,
            }
        )

    # No re-detection after the step and no embedding reset at the end: the step itself is compared.
    return BTUConfig(isolated_rows="mask", redetect_each_epoch=False, unlearning="none"), prepare


def _update(tmp_path, rows, tokenizer, defense=None, prepare=None, batch_size=ROWS, accumulation=1):
    """The parameter change of one optimizer step, and the trainer that made it."""
    model = _model()
    trainer = text_trainer(
        tmp_path,
        rows,
        tokenizer,
        model=model,
        defense=defense,
        args=dict(
            per_device_train_batch_size=batch_size,
            gradient_accumulation_steps=accumulation,
            max_steps=1,
            optim="sgd",
            learning_rate=0.5,
            lr_scheduler_type="constant",
            warmup_steps=0,
            weight_decay=0.0,
            max_grad_norm=0.0,
            train_sampling_strategy="sequential",
        ),
    )
    if prepare is not None:
        prepare(trainer)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer.train()
    return {name: p.detach() - before[name] for name, p in trainer.model.named_parameters()}, trainer


def _assert_same_update(accumulated, full):
    full_norm = torch.sqrt(sum((d.double() ** 2).sum() for d in full.values())).item()
    accumulated_norm = torch.sqrt(sum((d.double() ** 2).sum() for d in accumulated.values())).item()
    assert full_norm > 1e-2  # a real step, far above the tolerance
    for name, delta in full.items():
        torch.testing.assert_close(
            accumulated[name],
            delta,
            rtol=1e-4,
            atol=1e-7,
            msg=lambda m, n=name: (
                f"{n}: {m}\nThe accumulated update is {accumulated_norm / full_norm:.4f} x the "
                "full-batch one (in L2 norm over all parameters)."
            ),
        )


def _defended(kind):
    if kind == "none":
        # The model's own loss. transformers' Trainer skips its division by the accumulation steps for a model whose
        # forward takes **kwargs, trusting it to divide by num_items_in_batch; BertForSequenceClassification takes
        # **kwargs but averages each micro-batch (huggingface/transformers#47688), so the trainer has to divide.
        return None, None
    if kind == "btu":
        return _btu_after_detection(EVEN_ISOLATED)
    # The isolation phase, before any row is isolated. LGA per example is a mean of per-row terms, so it is linear
    # in the rows; the official code's batch LGA, sign(mean CE - gamma) * mean CE, depends on the micro-batch's mean
    # and does change when a batch is split into micro-batches.
    return ABLConfig(lga="per_example", isolation_epochs=5, unlearning_epochs=0), None


@pytest.mark.parametrize("kind", ["none", "btu", "abl"])
def test_four_accumulated_micro_batches_of_8_update_like_one_batch_of_32(kind, tmp_path, rows, tokenizer):
    defense, prepare = _defended(kind)
    full, _ = _update(tmp_path / "full", rows, tokenizer, defense, prepare)
    defense, prepare = _defended(kind)
    accumulated, trainer = _update(tmp_path / "ga", rows, tokenizer, defense, prepare, batch_size=8, accumulation=4)
    _assert_same_update(accumulated, full)
    if kind != "none":
        # The defended path really ran: its update is not the undefended one.
        plain, _ = _update(tmp_path / "plain", rows, tokenizer)
        assert any(not torch.allclose(plain[n], full[n], rtol=1e-3, atol=1e-6) for n in full)
    if kind == "btu":
        assert trainer.defense.num_isolated_seen == len(EVEN_ISOLATED)
