"""ABL through BackdoorSafeTrainer: the LGA loss, isolation against ground truth, masking, unlearning, bad input.

Tiny random models on real rows: SST-2 text with a one-word BadNet trigger, and CIFAR-10 images with a patch.
"""

import numpy as np
import pytest
import torch
from torch.nn import functional as F
from transformers import DefaultDataCollator

from hf_backdoor import BadNetConfig, poison_dataset, tokenize_dataset
from hf_backdoor.attacks.vision import ImageBadNetsConfig
from hf_backdoor.defenses import ABLConfig, build_defense
from hf_backdoor.defenses.abl import ABLDefense, lga_loss
from hf_backdoor.reports import write_report
from hf_backdoor.trainer import BackdoorSafeTrainer
from hf_backdoor.vision import default_image_processor, prepare_image_dataset
from tests.conftest import text_trainer, tiny_bert, tiny_cifar_vit, training_args

pytestmark = pytest.mark.usefixtures("one_thread")

# One layer and 64 positions: rows here are at most 48 tokens.
ONE_LAYER = dict(num_hidden_layers=1, max_position_embeddings=64)


ABL_ARGS = {"num_train_epochs": 3, "logging_steps": 1000}


def args(tmp_path, **overrides):
    return training_args(tmp_path, **{**ABL_ARGS, **overrides})


def abl_text_trainer(tmp_path, train, tokenizer, model, config, args=None, **kwargs):
    """A ``BackdoorSafeTrainer`` running ``config`` on tokenized text rows (three epochs, no log lines)."""
    return text_trainer(
        tmp_path, train, tokenizer, model=model, args={**ABL_ARGS, **(args or {})}, defense=config, **kwargs
    )


def test_lga_loss_is_the_formula():
    logits = torch.tensor([[4.0, 0.0], [0.0, 0.3], [1.0, 1.0], [-2.0, 3.0]])
    labels = torch.tensor([0, 1, 0, 0])
    ce = F.cross_entropy(logits, labels, reduction="none")  # 0.018, 0.554, 0.693, 5.007
    expected = torch.where(ce < 0.5, -ce, ce).mean()
    torch.testing.assert_close(lga_loss(logits, labels, gamma=0.5), expected)
    assert lga_loss(logits, labels, gamma=0.5) < ce.mean()  # the low-loss row is pushed up, not down
    torch.testing.assert_close(lga_loss(logits, labels, 0.5, per_example=False), ce.mean())  # batch mean > gamma
    torch.testing.assert_close(lga_loss(logits[:1], labels[:1], 0.5, per_example=False), -ce[0])
    logits.requires_grad_(True)
    lga_loss(logits[:1], labels[:1], gamma=0.5).backward()
    assert logits.grad[0, 0] > 0  # ascent: a descent step on LGA lowers the true logit of a well-fit row


def test_abl_isolates_the_poisoned_image_rows(tmp_path, cifar):
    # A large patch at a 20% rate: a trigger a tiny ViT learns within the LGA epochs.
    rows = poison_dataset(
        cifar["train"].select(range(256)), ImageBadNetsConfig(poison_rate=0.2, target_label=0, patch_size=10)
    )
    processor = default_image_processor()
    trainer = BackdoorSafeTrainer(
        model=tiny_cifar_vit(),
        args=args(
            tmp_path,
            num_train_epochs=9,
            per_device_train_batch_size=16,
            learning_rate=3e-3,
            remove_unused_columns=False,
            label_smoothing_factor=0.1,
        ),
        train_dataset=prepare_image_dataset(rows, processor, keep_row_index=True),
        processing_class=processor,
        data_collator=DefaultDataCollator(),
        defense=ABLConfig(isolation_epochs=8, isolation_ratio=0.05, unlearning_epochs=2),
    )
    trainer.train()
    report = trainer.defense_report
    isolated = report["isolated_row_indices"]
    truth = np.asarray(rows["poisoned"], dtype=bool)
    assert len(isolated) == 13 and report["isolation_epoch"] == 8
    precision = truth[isolated].mean()
    assert report["isolation"]["precision"] == pytest.approx(precision)
    assert report["isolation"]["recall"] == pytest.approx(truth[isolated].sum() / truth.sum())
    assert precision >= 0.6, report["isolation"]  # 0.2 for a random pick
    assert report["isolation"]["loss_auroc"] > 0.85
    assert report["isolation"]["at_ratio"]["0.05"]["precision"] == pytest.approx(precision)
    # Unlearning is gradient ascent on the isolated rows: their loss rises epoch after epoch.
    history = report["unlearning"]
    assert [h["epoch"] for h in history] == [0, 1, 2]
    assert history[0]["isolated_loss"] < history[1]["isolated_loss"] < history[2]["isolated_loss"]
    # Without the row_index column ABL cannot recognise rows across epochs: a clear error, not a silent no-op.
    plain = prepare_image_dataset(rows, processor, train=True)
    untracked = BackdoorSafeTrainer(
        model=tiny_cifar_vit(),
        args=args(tmp_path / "untracked", remove_unused_columns=False),
        train_dataset=plain,
        processing_class=processor,
        data_collator=DefaultDataCollator(),
        defense=ABLConfig(),
    )
    with pytest.raises(ValueError, match="keep_row_index=True"):
        untracked.train()


def test_predicted_logits_come_back_in_row_order(tmp_path, sst2, tokenizer):
    """The shared prediction pass (ABL's isolation, Z-defense's leave-out) batches text rows by length; each row's
    logits are still its own: those of the row predicted alone, in the dataset's order."""
    from hf_backdoor.defenses.exposure import model_dataset, predict_logits

    rows = sst2["train"].select(range(40))
    train = tokenize_dataset(rows, tokenizer, max_length=48)
    assert len(set(len(ids) for ids in train["input_ids"])) > 5  # lengths vary, so the order really changes
    model = tiny_bert(**ONE_LAYER, dropout=0.0)
    trainer = abl_text_trainer(tmp_path, train, tokenizer, model, ABLConfig())
    data = model_dataset(trainer, train)
    logits, labels = predict_logits(trainer, model, data, batch_size=8)
    model.eval()
    with torch.no_grad():
        alone = torch.cat([model(input_ids=torch.tensor([ids])).logits for ids in train["input_ids"]]).numpy()
    np.testing.assert_allclose(logits, alone, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(labels, np.asarray(rows["label"]))


def test_abl_on_text_isolates_and_masks_the_poisoned_rows(tmp_path, sst2, tokenizer):
    # Five "cf" per poisoned sentence at a 20% rate: a trigger a tiny random BERT learns within the LGA epochs.
    attack = BadNetConfig(triggers=("cf",), num_triggers=5, poison_rate=0.2)
    rows = poison_dataset(sst2["train"].select(range(320)), attack)
    train = tokenize_dataset(rows, tokenizer, max_length=48)
    trainer = abl_text_trainer(
        tmp_path,
        train,
        tokenizer,
        tiny_bert(**ONE_LAYER),
        ABLConfig(isolation_epochs=4, isolation_ratio=0.05, unlearning_epochs=1),
        args=dict(num_train_epochs=5, per_device_train_batch_size=16, learning_rate=3e-3, logging_steps=10),
    )
    trainer.train()
    report = trainer.defense_report
    isolated = report["isolated_row_indices"]
    truth = np.asarray(rows["poisoned"], dtype=bool)
    assert len(isolated) == 16 and report["isolation_epoch"] == 4
    assert truth[isolated].mean() >= 0.75, report["isolation"]  # 0.2 for a random pick
    assert report["isolation"]["loss_auroc"] > 0.85
    # What the report draws: the logged loss with the isolation step, the per-row losses with the cut.
    assert report["isolation_step"] == 80  # 4 epochs of 20 steps
    assert [h["step"] for h in report["loss_history"]] == list(range(10, 101, 10))
    histogram = report["isolation"]["loss_histogram"]
    assert sum(histogram["counts"]) == 320 and sum(histogram["counts_poisoned"]) == int(truth.sum())
    assert report["isolation_cut"] == report["isolation"]["loss_threshold"]
    figures = {figure.path for figure in write_report(tmp_path / "report", report)}
    assert {"figures/abl_loss_curve.png", "figures/abl_isolation_losses.png"} <= figures
    findings = ABLDefense.card_section(report)  # what the model card says ABL found
    assert "Isolated after epoch 4: **16** training rows of 320" in findings
    assert f"precision {report['isolation']['precision']:.2f}" in findings
    # Isolated rows are recognised in any batch by their row ids, and masked out of the loss.
    defense, model = trainer.defense, trainer.model
    others = [i for i in range(len(train)) if i not in isolated][:3]
    features = [{k: train[i][k] for k in ("input_ids", "attention_mask", "label")} for i in [isolated[0], *others]]
    trainer.batch_row_ids = torch.as_tensor(trainer.train_row_ids[[isolated[0], *others]])
    batch = defense.prepare_inputs(trainer, trainer.data_collator(features))
    assert batch["abl_isolated"].tolist() == [True, False, False, False]
    model.train()
    torch.manual_seed(0)
    masked = defense.compute_loss(trainer, model, dict(batch))
    torch.manual_seed(0)
    plain = F.cross_entropy(
        model(**{k: v for k, v in batch.items() if k not in ("labels", "abl_isolated")}).logits,
        batch["labels"],
        reduction="none",
    )[1:].mean()
    torch.testing.assert_close(masked, plain)
    all_isolated = {**batch, "abl_isolated": torch.ones(4, dtype=torch.bool)}
    assert defense.compute_loss(trainer, model, all_isolated).item() == 0.0


def plain_sgd_unlearning(**fields) -> ABLConfig:
    """ABL whose unlearning steps are plain SGD (no momentum, no weight decay): a step the test can compute by hand."""
    return ABLConfig(unlearning_momentum=0.0, unlearning_weight_decay=0.0, **fields)


@pytest.mark.parametrize("objective", ["ascent", "ascent_descent", "complementary"])
def test_unlearning_step_is_the_configured_objective(tmp_path, sst2, tokenizer, objective):
    """One unlearning step equals plain SGD on -CE(isolated) (the official code), on CE(retained) - CE(isolated)
    (the paper's global gradient ascent) or on CE(retained) - mean log(1 - p(label | isolated)), the retained batch
    drawn from the rows that were not isolated."""
    from hf_backdoor.defenses.abl import _endless_batches
    from hf_backdoor.defenses.exposure import iterate_batches, model_dataset

    rows = poison_dataset(sst2["train"].select(range(160)), BadNetConfig(triggers=("cf",), poison_rate=0.2))
    train = tokenize_dataset(rows, tokenizer, max_length=48)
    model = tiny_bert(**ONE_LAYER, dropout=0.0)  # no dropout: the step is deterministic
    config = plain_sgd_unlearning(unlearning_epochs=1, unlearning_learning_rate=0.1, unlearning_objective=objective)
    trainer = abl_text_trainer(tmp_path, train, tokenizer, model, config)
    isolated = np.flatnonzero(np.asarray(rows["poisoned"], dtype=bool)).tolist()[:16]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    iso_inputs, iso_labels = next(
        iterate_batches(trainer, model_dataset(trainer, train.select(isolated)), config.unlearning_batch_size)
    )
    iso_logits = model(**iso_inputs).logits
    if objective == "complementary":
        label_probability = iso_logits.softmax(-1).gather(1, iso_labels[:, None]).squeeze(1)
        objective_value = -torch.log1p(-label_probability).mean()
    else:
        objective_value = -F.cross_entropy(iso_logits, iso_labels)
    if objective != "ascent":
        rest = model_dataset(trainer, train.select([i for i in range(len(train)) if i not in set(isolated)]))
        ret_inputs, ret_labels = next(_endless_batches(trainer, rest, config.unlearning_batch_size, seed=1))
        assert len(ret_labels) == config.unlearning_batch_size
        objective_value = objective_value + F.cross_entropy(model(**ret_inputs).logits, ret_labels)
    gradients = torch.autograd.grad(objective_value, list(model.parameters()))
    expected = {n: before[n] - 0.1 * g for (n, _), g in zip(model.named_parameters(), gradients)}

    seen = []  # what the after-epoch callback is handed: the epoch and the weights as they stand after it
    history = trainer.defense.unlearn(
        trainer, isolated, after_epoch=lambda epoch, m: seen.append((epoch, m.classifier.bias.detach().clone()))
    )
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.detach(), expected[name], rtol=1e-4, atol=1e-6)
    assert [epoch for epoch, _ in seen] == [1] and torch.equal(seen[0][1], model.classifier.bias)
    assert history is trainer.defense.unlearning and trainer.defense.report()["isolated_row_indices"] == isolated
    assert history[1]["isolated_loss"] > history[0]["isolated_loss"]
    assert ("retained_train_loss" in history[1]) == (objective != "ascent")


def test_unlearning_on_its_own_names_rows_of_the_training_set(tmp_path, sst2, tokenizer):
    train = tokenize_dataset(sst2["train"].select(range(40)), tokenizer, max_length=48)
    trainer = abl_text_trainer(tmp_path, train, tokenizer, tiny_bert(**ONE_LAYER), ABLConfig(unlearning_epochs=1))
    with pytest.raises(ValueError, match=r"isolated_indices \[40, -1\] are outside the training set's 40 rows"):
        trainer.defense.unlearn(trainer, [3, 40, -1])
    with pytest.raises(ValueError, match="`isolated_indices` is empty"):
        trainer.defense.unlearn(trainer, [])


def _guarded_unlearning(tmp_path, sst2, tokenizer, guard_drop):
    """A tiny model that predicts the target label for every row, ABL's ascent at a rate that flips it in one step,
    and the isolated rows themselves (all labelled with the target) as the guard's held-out rows."""
    rows = poison_dataset(sst2["train"].select(range(160)), BadNetConfig(triggers=("cf",), poison_rate=0.2))
    train = tokenize_dataset(rows, tokenizer, max_length=48)
    model = tiny_bert(**ONE_LAYER)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 2.0]))  # p(target = 1) = 0.88 on every row
    isolated = np.flatnonzero(np.asarray(rows["poisoned"], dtype=bool)).tolist()[:16]
    config = plain_sgd_unlearning(
        unlearning_epochs=3,
        unlearning_learning_rate=100.0,
        unlearning_guard_drop=guard_drop,
        unlearning_guard_backtracks=2,
    )
    trainer = abl_text_trainer(tmp_path, train, tokenizer, model, config, eval_dataset=train.select(isolated))
    trainer.defense.isolated_indices = isolated
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.defense._unlearn(trainer)
    return model, before, trainer.defense


def test_unlearning_guard_undoes_a_step_that_costs_held_out_accuracy(tmp_path, sst2, tokenizer):
    """Without the guard one step at lr 100 moves every held-out row off its label; with it each such step is undone
    (the weights come back exactly), the learning rate halves, and the unlearning ends after the allowed undos."""
    model, before, defense = _guarded_unlearning(tmp_path, sst2, tokenizer, guard_drop=None)
    assert defense.unlearning[0]["isolated_accuracy"] == 1.0
    assert defense.unlearning[1]["isolated_accuracy"] < 0.5
    assert not torch.equal(model.classifier.bias, before["classifier.bias"])

    model, before, defense = _guarded_unlearning(tmp_path, sst2, tokenizer, guard_drop=0.05)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter.detach(), before[name]), name
    guard = defense.report()["unlearning_guard"]
    assert guard["baseline_accuracy"] == 1.0 and guard["rows"] == 16
    assert [u["learning_rate_after"] for u in guard["undone_steps"]] == [50.0, 25.0]
    assert all(u["accuracy"] < 0.95 for u in guard["undone_steps"])
    # 16 isolated rows make one step an epoch: epochs 1 and 2 are undone, and epoch 3 of 3 never runs
    assert [u["epoch"] for u in guard["undone_steps"]] == [1, 2]
    assert [h["epoch"] for h in defense.unlearning] == [0, 1, 2]
    assert all(h["guard_accuracy"] == 1.0 for h in defense.unlearning)
    assert "2 step(s) undone" in ABLDefense.card_section(defense.report())


def test_unlearning_guard_needs_held_out_rows(tmp_path, sst2, tokenizer):
    train = tokenize_dataset(sst2["train"].select(range(40)), tokenizer, max_length=48)
    trainer = abl_text_trainer(
        tmp_path, train, tokenizer, tiny_bert(**ONE_LAYER), ABLConfig(unlearning_guard_drop=0.05)
    )
    with pytest.raises(ValueError, match="pass one `eval_dataset`"):
        trainer.defense.on_train_begin(trainer)
    with pytest.raises(ValueError, match="unlearning_guard_drop must be in"):
        ABLConfig(unlearning_guard_drop=1.5)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"isolation_ratio": 0}, "isolation_ratio must be in"),
        ({"lga": "mean"}, "lga must be one of"),
        ({"isolation_epochs": 0}, "isolation_epochs"),
        ({"unlearning_objective": "descent"}, "unlearning_objective must be one of"),
    ],
)
def test_abl_config_errors_say_what_to_fix(fields, message):
    with pytest.raises(ValueError, match=message):
        ABLConfig(**fields)


def test_abl_builds_from_a_spec_and_restores_its_state():
    assert isinstance(build_defense({"name": "abl", "isolation_ratio": 0.05}).config, ABLConfig)
    state = build_defense(ABLConfig())
    state.load_state_dict({"isolated_indices": [3, 1], "isolation_done": True})
    assert state.state_dict()["isolated_indices"] == [3, 1] and state.state_dict()["isolation_done"]


def test_complementary_label_loss_is_bounded_and_flips_binary_labels():
    """On two classes -log(1 - p(y)) is the CE of the other label; at p(y) = 1 it stays finite (no runaway ascent)."""
    from hf_backdoor.defenses.abl import complementary_label_loss

    logits = torch.tensor([[2.0, -1.0], [0.3, 0.1], [-4.0, 5.0]])
    labels = torch.tensor([0, 1, 1])
    torch.testing.assert_close(complementary_label_loss(logits, labels), F.cross_entropy(logits, 1 - labels))
    saturated = complementary_label_loss(torch.tensor([[0.0, 200.0]]), torch.tensor([1]))
    assert torch.isfinite(saturated) and saturated.item() > 10
    assert complementary_label_loss(torch.tensor([[0.0, -200.0]]), torch.tensor([1])).item() < 1e-6
