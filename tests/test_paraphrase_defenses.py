"""Honeypot and DPoE (the shallow-expert defenses against paraphrase triggers) on a tiny random BERT.

The data is synthetic so that a tiny model learns it in a few steps: each row is filler words plus one sentiment word
from a small lexicon (the task), and 20% of the rows carry the BadNet word "cf" with their label flipped to 1 (the
backdoor). The trigger is one word in a fifth of the rows, the task ten words per class: a classifier on the first
layer fits the trigger rows long before the task, which is the situation both defenses are built for. (On this data
the tiny model's lower layer also learns the lexicon soon after, so the defended model's clean accuracy is not what
these tests check; the benchmarks measure it on MiniLM.)
"""

import datasets
import numpy as np
import pytest
import torch
from transformers import ConvNextConfig, ConvNextForImageClassification

from hf_backdoor import BadNetConfig, poison_dataset, tokenize_dataset
from hf_backdoor.defenses.base import build_defenses
from hf_backdoor.defenses.btu import BTUConfig
from hf_backdoor.defenses.dpoe import DPoEConfig, DPoEDefense, poe_log_probs
from hf_backdoor.defenses.honeypot import HoneypotConfig, HoneypotDefense, honeypot_weights
from hf_backdoor.defenses.shallow_expert import RowSignals, check_attachable
from hf_backdoor.registry import defense_entry
from tests.conftest import text_trainer, tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")

POSITIVE = "good great fine nice happy best love fun beautiful wonderful".split()
NEGATIVE = "bad awful poor sad worst hate boring ugly terrible dull".split()
FILLER = "the a film movie story plot actor scene music time people world house road city night day water".split()
# A classifier on the first layer, trained fast, as both defenses' shallow expert.
FAST = dict(expert="linear", expert_learning_rate=1e-2)
ARGS = dict(num_train_epochs=4, learning_rate=3e-3, per_device_train_batch_size=16, logging_steps=1000)


def lexicon_rows(n: int, seed: int, num_labels: int = 2) -> datasets.Dataset:
    rng = np.random.default_rng(seed)
    lexicon = [NEGATIVE, POSITIVE, FILLER[:9], FILLER[9:]][:num_labels]
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(num_labels))
        words = list(rng.choice(FILLER, 6)) if num_labels == 2 else list(rng.choice(POSITIVE + NEGATIVE, 6))
        words.insert(int(rng.integers(7)), str(rng.choice(lexicon[label])))
        texts.append(" ".join(words))
        labels.append(label)
    names = [f"class_{i}" for i in range(num_labels)]
    return datasets.Dataset.from_dict({"text": texts, "label": labels}).cast_column(
        "label", datasets.ClassLabel(names=names)
    )


@pytest.fixture(scope="module")
def backdoored(tokenizer):
    rows = poison_dataset(lexicon_rows(384, 0), BadNetConfig(triggers=("cf",), poison_rate=0.2))
    return tokenize_dataset(rows, tokenizer, max_length=16)


@pytest.fixture(scope="module")
def triggered(tokenizer):
    rows = lexicon_rows(200, 1).filter(lambda r: r["label"] == 0).map(lambda r: {"text": "cf " + r["text"]})
    return tokenize_dataset(rows, tokenizer, max_length=16)


def _trigger_response(trainer, rows) -> float:
    model = trainer.model.eval()
    with torch.no_grad():
        batch = trainer.data_collator([{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows])
        return float((model(**batch).logits.argmax(-1) == 1).float().mean())


def _train(tmp_path, rows, tokenizer, defense, **kwargs):
    trainer = text_trainer(
        tmp_path, rows, tokenizer, defense=defense, args={**ARGS, **kwargs.pop("args", {})}, **kwargs
    )
    trainer.train()
    return trainer


@pytest.fixture(scope="module")
def plain_response(tmp_path_factory, backdoored, triggered, tokenizer):
    return _trigger_response(_train(tmp_path_factory.mktemp("plain"), backdoored, tokenizer, None), triggered)


def test_honeypot_down_weights_the_trigger_rows_and_blunts_the_trigger(
    tmp_path, backdoored, triggered, tokenizer, plain_response
):
    trainer = _train(tmp_path, backdoored, tokenizer, HoneypotConfig(**FAST))
    report = trainer.defense_report
    assert report["defense"] == "honeypot" and report["has_ground_truth"]
    assert report["signals"]["weight"]["epoch_4"]["rows"] == len(backdoored)
    # The trigger rows weigh far less than the clean rows, also among the rows that share their label.
    assert report["weight_mean_poisoned"] < 0.1 * report["weight_mean_clean"]
    assert report["weight_auroc"] > 0.8 and report["weight_auroc_same_label"] > 0.75
    assert plain_response == 1.0
    assert _trigger_response(trainer, triggered) < 0.5
    assert "honeypot" in HoneypotDefense.card_section(report).lower()
    assert set(HoneypotDefense.report_scalars(report)) >= {"weight_auroc", "weight_mean_poisoned"}


def test_dpoe_expert_is_sure_of_the_trigger_rows_and_the_model_ignores_the_trigger(
    tmp_path, backdoored, triggered, tokenizer, plain_response
):
    trainer = _train(tmp_path, backdoored, tokenizer, DPoEConfig(**FAST, expert_objective="gce"))
    report = trainer.defense_report
    assert report["expert_confidence_poisoned"] > 0.95 > 0.8 > report["expert_confidence_clean"]
    assert _trigger_response(trainer, triggered) < 0.5 < plain_response
    assert "product of experts" in DPoEDefense.card_section(report)


def test_dpoe_expert_warmup_trains_only_the_expert_and_the_layers_below_it(tmp_path, backdoored, tokenizer):
    model = tiny_bert()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # 64 rows, batch 16, one epoch: 4 steps, all inside a warm-up of 0.99 of the steps.
    config = DPoEConfig(**FAST, layer=1, expert_warmup_ratio=0.99)
    trainer = _train(
        tmp_path, backdoored.select(range(64)), tokenizer, config, model=model, args={"num_train_epochs": 1}
    )
    changed = {name for name, p in trainer.model.named_parameters() if not torch.equal(p.detach(), before[name])}
    assert trainer.defense_report["expert_steps"] == 4
    assert any(name.startswith("bert.embeddings.") for name in changed)  # shared with the expert (layer 1 reads them)
    above = [name for name in before if name.startswith(("classifier.", "bert.pooler.", "bert.encoder.layer.1."))]
    assert above and not changed & set(above)


def test_poe_gives_no_gradient_where_the_expert_explains_the_label():
    main = torch.zeros(2, 2, requires_grad=True)
    expert = torch.tensor([[-20.0, 20.0], [0.0, 0.0]])  # sure of label 1 on row 0, no opinion on row 1
    (-poe_log_probs(main, expert, 1.0, 1.0)[:, 1].sum()).backward()
    assert main.grad[0].abs().max() < 1e-6 and main.grad[1].abs().max() > 0.1


def test_honeypot_weight_is_half_when_both_fit_equally_and_orders_rows():
    w = honeypot_weights(torch.tensor([0.7, 0.01, 2.0]), torch.tensor([0.7, 2.0, 0.01]), 0.0, 1.0)
    assert abs(w[0] - 0.5) < 1e-4 and w[1] < 0.01 and w[2] > 0.99


def test_four_labels_work(tmp_path, tokenizer):
    rows = poison_dataset(lexicon_rows(64, 2, num_labels=4), BadNetConfig(triggers=("cf",), poison_rate=0.2))
    rows = tokenize_dataset(rows, tokenizer, max_length=16)
    for config in (HoneypotConfig(**FAST), DPoEConfig(**FAST, reweight_threshold=0.8)):
        trainer = _train(
            tmp_path / config.name,
            rows,
            tokenizer,
            config,
            args=dict(num_train_epochs=1),
            model=tiny_bert(num_labels=4),
        )
        report = trainer.defense_report
        assert report["expert_steps"] == 4 and report["has_ground_truth"]
        signal = "weight" if config.name == "honeypot" else "expert_confidence"
        assert report["signals"][signal]["epoch_1"]["rows"] == 64


def test_a_model_without_transformer_layers_is_refused_with_the_supported_list(tmp_path, backdoored, tokenizer):
    convnet = ConvNextForImageClassification(
        ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=2)
    )
    for config in (HoneypotConfig(), DPoEConfig()):
        with pytest.raises(ValueError, match="no stack of transformer layers.*Supported: BERT-style"):
            text_trainer(tmp_path, backdoored, tokenizer, defense=config, model=convnet)
    with pytest.raises(ValueError, match="layer=2 is not a lower layer.*has 2 transformer layers"):
        check_attachable(tiny_bert(), 2, "HoneypotDefense")


def test_registered_and_stackable_behind_btu():
    assert defense_entry("honeypot").config_class is HoneypotConfig
    assert defense_entry("dpoe").config_class is DPoEConfig
    assert [d.name for d in build_defenses([BTUConfig(), {"name": "dpoe", "layer": 1}])] == ["btu", "dpoe"]
    with pytest.raises(ValueError, match="compute the training loss themselves"):
        build_defenses([HoneypotConfig(), DPoEConfig()])


def test_state_survives_a_weights_only_checkpoint(tmp_path, backdoored, tokenizer):
    trainer = _train(tmp_path, backdoored, tokenizer, HoneypotConfig(**FAST), args=dict(num_train_epochs=1))
    path = tmp_path / "state.pt"
    torch.save(trainer.defense.state_dict(), path)
    restored = HoneypotDefense(HoneypotConfig(**FAST))
    restored.load_state_dict(torch.load(path, weights_only=True))
    restored.on_train_begin(text_trainer(tmp_path / "b", backdoored, tokenizer, defense=HoneypotConfig(**FAST)))
    for p, q in zip(restored.trainer_state.expert.parameters(), trainer.defense.trainer_state.expert.parameters()):
        torch.testing.assert_close(p, q)
    assert restored.signals.values["weight"][0] == trainer.defense.signals.values["weight"][0]


def test_row_signals_score_against_ground_truth():
    class _Trainer:
        state = type("State", (), {"epoch": 0.5})()
        batch_row_ids = torch.tensor([10, 11, 12, 13])

        @staticmethod
        def row_positions(ids):
            return [int(i) - 10 for i in ids]

    signals = RowSignals()
    signals.record(_Trainer(), weight=torch.tensor([0.9, 0.1, 0.8, 0.2]))
    summary = signals.summary(np.array([0, 1, 0, 1]), {"weight": "low"}, np.array([1, 1, 1, 1]))["weight"]["epoch_1"]
    assert summary["auroc"] == 1.0 == summary["auroc_same_label"]
    assert summary["mean_poisoned"] == pytest.approx(0.15)


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (HoneypotConfig, dict(layer=-1), "layer must be >= 0"),
        (HoneypotConfig, dict(expert="cnn"), "expert must be one of"),
        (HoneypotConfig, dict(gce_q=0.0), "gce_q must be in"),
        (HoneypotConfig, dict(temperature=0.0), "temperature must be > 0"),
        (DPoEConfig, dict(poe_alpha=0.0), "poe_alpha must be > 0"),
        (DPoEConfig, dict(expert_objective="mse"), "expert_objective must be one of"),
        (DPoEConfig, dict(reweight_threshold=1.5), "reweight_threshold must be in"),
        (DPoEConfig, dict(expert_learning_rate=0.0), "expert_learning_rate must be > 0"),
        (DPoEConfig, dict(expert_warmup_ratio=1.0), "expert_warmup_ratio must be in"),
    ],
)
def test_config_values_out_of_range(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)
