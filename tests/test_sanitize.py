"""Post-training removal (``trainer.sanitize``): units and masks, RNP, NAD, TSBD/NWC and the fine-tuning baseline.

Tiny random BERT/ViT configs, the real MiniLM tokenizer and real SST-2 rows.
"""

import copy
import json
import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DistilBertConfig,
    DistilBertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    Trainer,
    TrainingArguments,
    ViTConfig,
    ViTForImageClassification,
)

from hf_backdoor import BadNetConfig, poison_dataset, tokenize_dataset
from hf_backdoor.defenses import (
    SANITIZERS,
    BTUConfig,
    ExposeConfig,
    FinetuneConfig,
    FinetuneDefense,
    NADConfig,
    NADDefense,
    NWCConfig,
    NWCDefense,
    RepairDefense,
    RNPConfig,
    RNPDefense,
    SanitizeConfig,
    SanitizeContext,
    TransformerUnits,
    exposed_defenses,
    prune_at_threshold,
    sanitize_model,
)
from hf_backdoor.defenses.base import defense_class_for_report
from hf_backdoor.defenses.nad import attention_loss, attention_map
from hf_backdoor.defenses.nwc import activeness_aware_step, choose_n, neuron_weight_changes, zero_top_weights
from hf_backdoor.defenses.rnp import choose_threshold
from hf_backdoor.defenses.sanitize import clean_threshold_for, get_sanitize_config
from hf_backdoor.registry import DEFENSES, defense_entry, register_defense
from hf_backdoor.trainer import BackdoorSafeTrainer
from tests import conftest
from tests.conftest import text_trainer


def tiny_bert(seed=0, layers=2):
    """The shared tiny BERT with 64 positions, in eval mode."""
    return conftest.tiny_bert(seed, num_hidden_layers=layers, max_position_embeddings=64).eval()


def tiny_vit(seed=0):
    torch.manual_seed(seed)
    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=16,
        patch_size=4,
        num_labels=3,
    )
    return ViTForImageClassification(config).eval()


def _ids(seed=0, batch=3, length=12):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 30000, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -4:] = 0  # one padded row, so masking interacts with padding
    return {"input_ids": ids, "attention_mask": mask}


def _pixels(seed=0):
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed))}


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _trainer(tmp_path, model, tokenizer, train=None, cls=BackdoorSafeTrainer, **kw):
    """:func:`text_trainer` with this module's training: 3 epochs at lr 2e-3, eval batches of 128; ``kw`` overrides."""
    args = {"per_device_eval_batch_size": 128, "num_train_epochs": 3, "learning_rate": 2e-3, "logging_steps": 1000}
    return text_trainer(tmp_path, train, tokenizer, cls=cls, model=model, args={**args, **kw})


# -- units ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "architecture"),
    [(tiny_bert, "bert"), (tiny_vit, "vit")],
)
def test_unit_discovery_counts(make, architecture):
    model = make()
    units = TransformerUnits.discover(model, ("ffn", "head", "layernorm"))
    assert units.spec.name == architecture and units.num_layers == 2
    # 2 layers x (64 FFN neurons, 2 heads, 2 LayerNorms of 32 channels)
    assert units.counts() == {"ffn": 128, "head": 4, "layernorm": 128}
    assert units.num_units == 260
    assert [g.name for g in units.groups[:4]] == [
        "layer0.head",
        "layer0.ffn",
        *(f"layer0.{n}" for n in units.spec.layernorms),
    ]
    # Every Linear of the encoder layers, none of the embeddings / pooler / classifier.
    linears = [name for name, _ in units.linear_layers(model)]
    assert len(linears) == 12 and not any("classifier" in n or "pooler" in n for n in linears)


def test_discovery_of_distilbert_and_unsupported_models():
    distil = DistilBertForSequenceClassification(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=64))
    assert TransformerUnits.discover(distil, "ffn").counts() == {"ffn": 64}
    gpt2 = GPT2ForSequenceClassification(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100))
    with pytest.raises(ValueError, match="Supported: BERT-family encoders"):
        TransformerUnits.discover(gpt2)
    with pytest.raises(ValueError, match="Unit kinds"):
        TransformerUnits.discover(tiny_bert(), ("neurons",))


@pytest.mark.parametrize(("make", "inputs"), [(tiny_bert, _ids), (tiny_vit, _pixels)])
def test_masks_at_one_leave_outputs_bit_identical(make, inputs):
    model = make()
    batch = inputs()
    with torch.no_grad():
        reference = model(**batch).logits
        units = TransformerUnits.discover(model, ("ffn", "head", "layernorm"))
        masks = units.new_masks()
        with units.attach(model, masks):
            masked = model(**batch).logits
            masks[0].data[0] = 0.5  # and a mask below 1 does change them: the hooks are live
            changed = model(**batch).logits
        after = model(**batch).logits  # hooks removed
    assert torch.equal(masked, reference) and torch.equal(after, reference)
    assert not torch.equal(changed, reference)


def test_pruning_a_unit_removes_its_contribution():
    model = tiny_bert()
    batch = _ids()
    units = TransformerUnits.discover(model, ("ffn", "head", "layernorm"))
    layer = model.bert.encoder.layer[0]
    head_dim = 16

    def hidden_after_perturbing(net):
        # Perturb what feeds FFN neuron 5 and head 1 of layer 0 (their input weights).
        net = copy.deepcopy(net)
        with torch.no_grad():
            # Random, not constant: a LayerNorm output sums to ~0 over channels, so a constant shift does nothing.
            g = torch.Generator().manual_seed(1)
            net.bert.encoder.layer[0].intermediate.dense.weight[5] += torch.randn(32, generator=g)
            net.bert.encoder.layer[0].attention.self.value.weight[head_dim : 2 * head_dim] += torch.randn(
                head_dim, 32, generator=g
            )
            return net.bert(**batch).last_hidden_state

    with torch.no_grad():
        base = model.bert(**batch).last_hidden_state
    assert (hidden_after_perturbing(model) - base).abs().max() > 1e-2  # they matter before pruning

    selection = [torch.zeros(g.size, dtype=torch.bool) for g in units.groups]
    selection[0][1] = True  # layer 0, head 1
    selection[1][5] = True  # layer 0, FFN neuron 5
    selection[2][7] = True  # layer 0, channel 7 of the attention LayerNorm
    pruned = copy.deepcopy(model)
    assert units.prune(pruned, selection) == 3
    with torch.no_grad():
        pruned_hidden = pruned.bert(**batch).last_hidden_state
        # Same as masking those units to 0 through the hooks...
        masks = units.new_masks()
        for mask, selected in zip(masks, selection):
            mask.data[selected] = 0.0
        with units.attach(model, masks):
            masked_hidden = model.bert(**batch).last_hidden_state
    torch.testing.assert_close(pruned_hidden, masked_hidden)
    # ... and what fed the pruned neuron and head no longer reaches the output.
    assert torch.equal(hidden_after_perturbing(pruned), pruned_hidden)
    # The pruned LayerNorm channel is its bias for every token.
    seen = {}
    hook = pruned.bert.encoder.layer[0].attention.output.LayerNorm.register_forward_hook(
        lambda m, a, out: seen.setdefault("out", out)
    )
    with torch.no_grad():
        pruned(**batch)
    hook.remove()
    bias = layer.attention.output.LayerNorm.bias[7]
    assert torch.equal(seen["out"][..., 7], torch.full_like(seen["out"][..., 7], bias.item()))


# -- NAD --------------------------------------------------------------------------------------------------------------


def test_nad_attention_map_is_normalised_and_its_loss_vanishes_for_equal_features():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 7, 16, generator=g)
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    att = attention_map(hidden, mask)
    torch.testing.assert_close(att.norm(dim=1), torch.ones(3), atol=1e-5, rtol=0)
    assert torch.all(att[1, 4:] == 0)
    # sum_d |h|^2 per token, normalised: the larger activation, the larger the map.
    expected = hidden[0].pow(2).sum(-1)
    torch.testing.assert_close(att[0], expected / expected.norm(), atol=1e-5, rtol=0)
    assert attention_loss(hidden, hidden.clone(), mask).item() == 0.0
    other = torch.randn(3, 7, 16, generator=g)
    assert attention_loss(hidden, other, mask).item() > 0
    # Padding content is ignored.
    noisy = hidden.clone()
    noisy[1, 4:] += 100.0
    assert attention_loss(noisy, hidden, mask).item() == 0.0


def test_nad_layers_default_to_three_evenly_spaced_ending_at_the_last():
    assert NADConfig().resolve_layers(6) == (2, 4, 6)
    assert NADConfig().resolve_layers(12) == (4, 8, 12)
    assert NADConfig(layers=(1,), betas=(100.0,)).resolve_layers(2) == (1,)
    with pytest.raises(ValueError, match="exceed"):
        NADConfig(layers=(1, 2, 9)).resolve_layers(6)


# -- TSBD / NWC ---------------------------------------------------------------------------------------------------------


def test_nwc_zeroes_exactly_the_top_m_weights_of_the_top_n_neurons():
    original = tiny_bert()
    unlearned = copy.deepcopy(original)
    with torch.no_grad():
        for p in unlearned.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    names = [n for n, _ in TransformerUnits.discover(original).linear_layers(original)]
    changes = neuron_weight_changes(original, unlearned, names)
    rows = sum(original.get_submodule(n).weight.shape[0] for n in names)
    assert changes.num_neurons == rows
    nwc = [v for _, _, v in changes.order]
    assert nwc == sorted(nwc, reverse=True)

    top_n, m = 10, 0.7
    model = copy.deepcopy(original)
    numbers = zero_top_weights(model, changes, top_n, m)
    top = changes.order[:top_n]
    pooled = torch.cat([changes.change[layer][row] for layer, row, _ in top])
    assert numbers["zeroed_weights"] == int(pooled.numel() * m) == numbers["pooled_weights"] * m // 1
    cutoff = torch.sort(pooled, descending=True).values[int(pooled.numel() * m) - 1]
    top_rows = {(changes.names[layer], row) for layer, row, _ in top}
    for name in names:
        before = original.get_submodule(name).weight
        after = model.get_submodule(name).weight
        changed = before != after
        for row in range(before.shape[0]):
            if (name, row) in top_rows:
                layer = changes.names.index(name)
                expected = changes.change[layer][row] >= cutoff
                assert torch.equal(changed[row], expected & (before[row] != 0))
                assert torch.all(after[row][expected] == 0)
            else:
                assert not changed[row].any()


def test_activeness_aware_step_matches_the_formula():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 1, 0, 1])
    r, alpha, lr = 0.05, 0.7, 0.1

    def loss_fn(net):
        return nn.functional.cross_entropy(net(x), y)

    theta = [p.detach().clone() for p in model.parameters()]
    g1 = torch.autograd.grad(loss_fn(model), list(model.parameters()))
    shifted = copy.deepcopy(model)
    with torch.no_grad():
        for p, g in zip(shifted.parameters(), g1):
            p.add_(r * g / g.norm())
    g2 = torch.autograd.grad(loss_fn(shifted), list(shifted.parameters()))
    expected = [t - lr * ((1 - alpha) * a + alpha * b) for t, a, b in zip(theta, g1, g2)]

    activeness_aware_step(model, loss_fn, torch.optim.SGD(model.parameters(), lr=lr), r, alpha)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e)
    # alpha = 0 is a plain SGD step.
    plain = copy.deepcopy(model)
    ref = copy.deepcopy(model)
    activeness_aware_step(plain, loss_fn, torch.optim.SGD(plain.parameters(), lr=lr), r, 0.0)
    opt = torch.optim.SGD(ref.parameters(), lr=lr)
    loss_fn(ref).backward()
    opt.step()
    for p, q in zip(plain.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q)


# -- configs and thresholds -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "kwargs", "match"),
    [
        (RNPConfig, {"units": ("neurons",)}, "units"),
        (RNPConfig, {"threshold": 1.0}, "would prune every unit"),
        (RNPConfig, {"recovering_lr": 0}, "recovering_lr"),
        (RNPConfig, {"holdout_fraction": 1.0}, "holdout_fraction"),
        (NADConfig, {"betas": (1.0, -1.0)}, "betas"),
        (NADConfig, {"layers": (1, 2), "betas": (1.0,)}, "one beta per layer"),
        (NWCConfig, {"m": 0}, "m must be"),
        (NWCConfig, {"n_ratio": 1.5}, "n_ratio"),
        (NWCConfig, {"alpha": 2}, "alpha"),
        (FinetuneConfig, {"epochs": 0}, "epochs"),
        (FinetuneConfig, {"max_holdout_drop": 0.0}, "max_holdout_drop"),
        (RNPConfig, {"refuse_holdout_drop": True, "max_holdout_drop": None}, "needs a max_holdout_drop"),
    ],
)
def test_bad_configs_say_what_to_fix(factory, kwargs, match):
    with pytest.raises(ValueError, match=match):
        factory(**kwargs)


def test_configs_resolve_by_name_and_dict():
    assert isinstance(get_sanitize_config("rnp"), RNPConfig)
    assert get_sanitize_config({"name": "nwc", "m": 0.5}).m == 0.5
    with pytest.raises(ValueError, match="registered"):
        get_sanitize_config("anp")


def test_unlearning_threshold_keeps_its_place_between_collapse_and_perfect():
    cifar = np.repeat(np.arange(10), 5)
    binary = np.repeat(np.arange(2), 5)
    assert clean_threshold_for(0.2, cifar) == pytest.approx(0.2)
    assert clean_threshold_for(0.1, cifar) == pytest.approx(0.1)
    assert clean_threshold_for(0.2, binary) == pytest.approx(0.5 + 0.5 / 9)
    assert clean_threshold_for(0.1, binary) == pytest.approx(0.5)


def test_rnp_threshold_choice_uses_held_out_accuracy_and_refuses_to_prune_everything():
    values = np.array([0.0, 0.05, 0.3, 1.0, 1.0])
    sweep = [
        {"threshold": 0.0, "num_pruned": 1, "holdout_accuracy": 0.90},
        {"threshold": 0.1, "num_pruned": 2, "holdout_accuracy": 0.89},
        {"threshold": 0.5, "num_pruned": 3, "holdout_accuracy": 0.80},
    ]
    config = RNPConfig(max_accuracy_drop=0.02)
    assert choose_threshold(values, sweep, 0.90, config)[0] == 0.1
    assert choose_threshold(values, sweep, 0.90, RNPConfig(threshold=0.5))[0] == 0.5
    with pytest.raises(ValueError, match="would prune all 5 units"):
        choose_threshold(np.zeros(5), sweep, 0.9, RNPConfig(threshold=0.0))
    with pytest.raises(ValueError, match="would prune all 5 units"):
        choose_threshold(np.zeros(5), [{"threshold": 0.0, "num_pruned": 5}], 0.9, config)
    with pytest.raises(RuntimeError, match="Even the smallest threshold"):
        choose_threshold(values, sweep, 0.99, config)
    # A drop stops the walk even when a larger threshold scores well again on the small held-out set.
    bumpy = [{**r, "holdout_accuracy": a} for r, a in zip(sweep, (0.90, 0.85, 0.90))]
    assert choose_threshold(values, bumpy, 0.90, config)[0] == 0.0


def test_nwc_n_choice_walks_up_the_sweep_until_the_first_large_drop():
    sweep = [{"n_ratio": n, "holdout_accuracy": a} for n, a in ((0.01, 0.9), (0.05, 0.85), (0.1, 0.7), (0.2, 0.88))]
    assert choose_n(sweep, 0.9, NWCConfig(max_zeroing_drop=0.1))[0] == 0.05
    assert choose_n(sweep, 0.9, NWCConfig(max_zeroing_drop=0.3))[0] == 0.2
    n, rule = choose_n(sweep, 1.0, NWCConfig(max_zeroing_drop=0.05))
    assert n == NWCConfig().n_ratios[0] and "smallest" in rule


# -- through the Trainer ------------------------------------------------------------------------------------------------


def test_finetune_through_the_trainer_reports_logs_and_replaces_the_model(tmp_path, tokenizer, clean_rows):
    trainer = _trainer(tmp_path, tiny_bert(), tokenizer)
    original = trainer.model
    before = _state(original)
    model, report = trainer.sanitize(clean_rows, FinetuneConfig(epochs=2, batch_size=40, learning_rate=0.05))
    assert model is trainer.model is original and not _same_state(model, before)
    assert report == json.loads((tmp_path / "sanitize_report_finetune.json").read_text())
    assert report["num_fit_rows"] + report["num_holdout_rows"] == 100 and report["num_holdout_rows"] == 20
    assert [h["epoch"] for h in report["finetune_history"]] == [1, 2]
    assert report["holdout_accuracy_after"] == report["finetune_history"][-1]["holdout_accuracy"]
    assert any("sanitize/finetune/holdout_accuracy_after" in h for h in trainer.state.log_history)

    # replace_model=False: a repaired copy, the trainer's model untouched.
    kept = _state(trainer.model)
    copy_model, _ = trainer.sanitize(clean_rows, FinetuneConfig(epochs=1, batch_size=40, replace_model=False))
    assert copy_model is not trainer.model and _same_state(trainer.model, kept)
    assert not _same_state(copy_model, kept)


def test_bad_input_raises_and_leaves_the_model_untouched(tmp_path, tokenizer, clean_rows):
    trainer = _trainer(tmp_path, tiny_bert(), tokenizer)
    before = _state(trainer.model)
    one_class = clean_rows.filter(lambda row: row["label"] == 1)
    with pytest.raises(ValueError, match="single class"):
        trainer.sanitize(one_class, RNPConfig())
    with pytest.raises(ValueError, match="at least 10"):
        trainer.sanitize(clean_rows.select(range(5)), "finetune")
    # A defense that fails half-way (unlearning cannot lower the accuracy at this rate): the model is untouched.
    with pytest.raises(RuntimeError, match="did not bring the clean accuracy"):
        trainer.sanitize(
            clean_rows, RNPConfig(unlearning_lr=1e-9, unlearning_max_epochs=1, clean_threshold=0.0, batch_size=80)
        )
    assert _same_state(trainer.model, before)

    gpt2 = GPT2ForSequenceClassification(
        GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=30522, pad_token_id=0, num_labels=2)
    )
    gpt_trainer = _trainer(tmp_path, gpt2, tokenizer)
    gpt_before = _state(gpt2)
    for config in (RNPConfig(), NWCConfig()):
        with pytest.raises(ValueError, match="Supported: BERT-family"):
            gpt_trainer.sanitize(clean_rows, config)
    assert _same_state(gpt2, gpt_before)


@pytest.fixture(scope="module")
def memorised(sst2, tokenizer, tmp_path_factory):
    """A small random BERT trained on 400 real SST-2 rows (20% carrying the BadNet trigger ``cf``, label 1).

    A random model this small cannot generalise on SST-2 from 400 rows; the clean function it has is its memory of
    the clean training rows, which is what a repair must keep.
    """
    attack = BadNetConfig(triggers=("cf",), poison_rate=0.2, seed=0)
    rows = poison_dataset(sst2["train"].select(range(400)), attack)
    train = tokenize_dataset(rows, tokenizer, max_length=32)
    clean = np.flatnonzero(np.asarray(rows["poisoned"]) == 0)
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=30522,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=128,
            max_position_embeddings=64,
            num_labels=2,
        )
    )
    trainer = _trainer(
        tmp_path_factory.mktemp("memorised"),
        model,
        tokenizer,
        train=train,
        cls=Trainer,
        num_train_epochs=8,
        learning_rate=3e-3,
    )
    trainer.train()
    return trainer.model, train.remove_columns(["poisoned", "orig_label"]).select(clean[:100])


@pytest.mark.slow
def test_rnp_recovery_masks_off_the_units_that_break_clean_accuracy(tmp_path, tokenizer, memorised):
    """RNP's recovery step on real data: units sabotaged to break the clean function get masks near 0, the others
    stay near 1, and pruning at RNP's threshold restores the clean accuracy."""
    from hf_backdoor.defenses.rnp import prune_selection, recover_masks

    model, clean = memorised
    trainer = _trainer(tmp_path, copy.deepcopy(model), tokenizer)
    config = RNPConfig(batch_size=40)
    context = SanitizeContext(trainer, clean, config, num_labels=2)
    sabotaged = copy.deepcopy(model)
    units = TransformerUnits.discover(sabotaged, "ffn")
    broken = [3, 17, 40, 99]
    with torch.no_grad():
        fc2 = sabotaged.bert.encoder.layer[1].output.dense.weight
        fc2[:, broken] = torch.randn(fc2.shape[0], len(broken), generator=torch.Generator().manual_seed(0)) * 5
        # Switch the sabotaged neurons on for every token: training may have left them silent.
        sabotaged.bert.encoder.layer[1].intermediate.dense.bias[broken] = 5.0
    assert context.accuracy(model, "fit") > 0.95 and context.accuracy(sabotaged, "fit") < 0.8

    masks, history = recover_masks(context, config, units, sabotaged)
    assert history[-1]["train_accuracy"] > 0.95
    layer1 = masks[1].detach()
    assert torch.all(layer1[broken] < 0.2)
    others = torch.ones(128, dtype=torch.bool)
    others[broken] = False
    assert layer1[others].mean() > 0.9 and masks[0].detach().mean() > 0.9
    pruned = units.prune(sabotaged, prune_selection(units, masks, 0.2))
    assert len(broken) <= pruned <= 12
    assert context.accuracy(sabotaged, "fit") > 0.95


@pytest.mark.slow
def test_nad_and_nwc_run_end_to_end_on_bert_and_vit(tmp_path, tokenizer, clean_rows):
    trainer = _trainer(tmp_path, tiny_bert(), tokenizer)
    _, report = trainer.sanitize(clean_rows, NADConfig(teacher_epochs=1, epochs=1, batch_size=40))
    assert report["layers"] == [1, 1, 2] and len(report["distillation_history"]) == 1
    _, report = trainer.sanitize(clean_rows, NWCConfig(unlearning_lr=0.05, finetune_epochs=1, batch_size=40))
    assert [r["n_ratio"] for r in report["n_sweep"]] == list(NWCConfig().n_ratios)
    assert report["zeroing_zeroed_weights"] > 0


def test_rnp_runs_on_a_vit_with_lazy_image_transforms(tmp_path):
    from hf_backdoor.vision import default_image_processor, load_image_task, prepare_image_dataset

    cifar = load_image_task("cifar10")
    clean = prepare_image_dataset(cifar["train"].select(range(60)), default_image_processor(32))
    torch.manual_seed(0)
    vit = ViTForImageClassification(
        ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            image_size=32,
            patch_size=8,
            num_labels=10,
        )
    )
    args = TrainingArguments(
        output_dir=str(tmp_path), report_to="none", use_cpu=True, remove_unused_columns=False, disable_tqdm=True
    )
    original = copy.deepcopy(vit)
    trainer = Trainer(model=vit, args=args)
    config = RNPConfig(
        units=("head", "ffn"), recovering_epochs=2, recovering_lr=20.0, batch_size=32, max_accuracy_drop=1.0
    )
    model, report = sanitize_model(trainer, clean, config)  # a plain Trainer works too
    counts = np.bincount(cifar["train"].select(range(60))["label"])
    assert report["unit_counts"] == {"head": 4, "ffn": 128}
    assert report["num_holdout_rows"] == sum(min(max(round(0.2 * c), 1), c - 1) for c in counts if c > 1)
    # Chosen on the held-out rows only: the largest threshold of the sweep that prunes less than everything.
    scored = [r for r in report["threshold_sweep"] if "holdout_accuracy" in r]
    assert report["prune_threshold"] == max(r["threshold"] for r in scored)
    for unit in report["pruned_units"]:  # every reported unit is zeroed in the returned model
        weight = model.get_submodule(unit["module"]).weight
        width = 16 if unit["kind"] == "head" else 1
        assert torch.all(weight[:, unit["index"] * width : (unit["index"] + 1) * width] == 0)
    shares = report["unlearned_prediction_shares"]  # where the unlearned model sent the 60 clean rows
    assert len(shares) == 10 and abs(sum(shares) - 1) < 1e-3 and report["unlearned_top_label"] == int(np.argmax(shares))
    # The report alone re-prunes the original weights: at the chosen threshold, exactly the returned model.
    assert report["num_pruned"] > 0
    repruned = copy.deepcopy(original)
    assert prune_at_threshold(repruned, report, report["prune_threshold"]) == report["num_pruned"]
    for name, value in model.state_dict().items():
        assert torch.equal(value, repruned.state_dict()[name]), name
    smaller = [r for r in report["threshold_sweep"] if r["threshold"] < report["prune_threshold"]][0]
    assert prune_at_threshold(copy.deepcopy(original), report, smaller["threshold"]) == smaller["num_pruned"]
    with pytest.raises(ValueError, match="the model the report was made on"):
        prune_at_threshold(copy.deepcopy(original), {**report, "units": ["ffn"]}, 0.5)


def _pixel_passes(context, part, passes=2):
    """The pixel values of ``part``'s rows, in order, read ``passes`` times (torch seeded once, before the first)."""
    torch.manual_seed(0)
    return [torch.cat([batch["pixel_values"] for batch in context.loader(part, batch_size=16)]) for _ in range(passes)]


def test_image_repairs_train_on_augmented_rows_and_read_stored_ones(tmp_path, tokenizer, clean_rows):
    from hf_backdoor.vision import default_image_processor, load_image_task, prepare_image_dataset

    images = load_image_task("cifar10")["train"].select(range(40))
    clean = prepare_image_dataset(images, default_image_processor(32))  # an evaluation transform, as users pass
    args = conftest.training_args(tmp_path, remove_unused_columns=False)
    trainer = Trainer(model=conftest.tiny_cifar_vit(), args=args)
    context = SanitizeContext(trainer, clean, SanitizeConfig(), num_labels=10)
    assert context.fit_augmentation == "random crop (reflect padding 4) and horizontal flip"
    stored, again = _pixel_passes(context, "fit")
    first, second = _pixel_passes(context, "train")
    assert torch.equal(stored, again)  # thresholds and accuracies read the images as stored
    assert first.shape == stored.shape and not torch.equal(first, second) and not torch.equal(first, stored)
    # A flip-only transform (a model trained without the crop) keeps its own setting; augment=False trains on the
    # stored images, as every repair did before.
    flip_only = prepare_image_dataset(images, default_image_processor(32), crop_padding=0)
    assert SanitizeContext(trainer, flip_only, SanitizeConfig(), 10).fit_augmentation == "horizontal flip"
    training_transform = flip_only.format["format_kwargs"]["transform"].with_augmentation()
    assert training_transform.without_augmentation().with_augmentation().describe_augmentation() == "horizontal flip"
    off = SanitizeContext(trainer, clean, SanitizeConfig(augment=False), num_labels=10)
    assert off.fit_augmentation is None and all(torch.equal(t, stored) for t in _pixel_passes(off, "train"))
    # Text has nothing to augment: the training rows are the fit rows.
    text = SanitizeContext(_trainer(tmp_path, tiny_bert(), tokenizer), clean_rows, SanitizeConfig(), 2)
    assert text.fit_augmentation is None and text.train_rows is text.fit
    # The report and the card say it.
    _, report = sanitize_model(trainer, clean, FinetuneConfig(epochs=1, batch_size=32))
    assert report["fit_augmentation"] == context.fit_augmentation
    assert any("random crop (reflect padding 4)" in line for line in FinetuneDefense.repair_lines(report))


def test_a_saved_image_model_keeps_its_training_augmentation_for_raw_rows(tmp_path):
    from transformers import AutoModelForImageClassification, DefaultDataCollator

    from hf_backdoor.defenses import expose_model
    from hf_backdoor.vision import (
        TRAINING_AUGMENTATION_KEY,
        default_image_processor,
        load_image_task,
        prepare_image_dataset,
        recorded_training_augmentation,
    )

    images = load_image_task("cifar10")["train"].select(range(60))
    processor = default_image_processor(32)
    flip_only = prepare_image_dataset(images, processor, train=True, crop_padding=0)  # the ABL setting: no crop
    args = conftest.training_args(tmp_path / "train", num_train_epochs=1, remove_unused_columns=False)
    kwargs = dict(processing_class=processor, data_collator=DefaultDataCollator())
    trained = BackdoorSafeTrainer(model=conftest.tiny_cifar_vit(), args=args, train_dataset=flip_only, **kwargs)
    trained.train()
    trained.save_model(str(tmp_path / "saved"))
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "saved")
    assert getattr(loaded.config, TRAINING_AUGMENTATION_KEY) == {"crop_padding": 0, "horizontal_flip": True}
    # Read back from disk, with no training set: raw rows still get the flip only, in a repair and in an exposure.
    eval_args = conftest.training_args(tmp_path / "eval", remove_unused_columns=False)
    trainer = Trainer(model=loaded, args=eval_args, **kwargs)
    assert SanitizeContext(trainer, images, SanitizeConfig(), 10).fit_augmentation == "horizontal flip"
    _, report = sanitize_model(trainer, images, FinetuneConfig(epochs=1, batch_size=32, replace_model=False))
    assert report["fit_augmentation"] == "horizontal flip"
    exposure = expose_model(trainer, images, ExposeConfig(epochs=1, escalate=0, min_rows_per_class=1))
    assert exposure.augmentation == "horizontal flip"
    # Rows prepared with the default crop for this model are used as given, with a warning that says what to pass.
    with pytest.warns(UserWarning, match=r"trained with \{'crop_padding': 0.*crop_padding=0, horizontal_flip=True"):
        SanitizeContext(trainer, prepare_image_dataset(images, processor), SanitizeConfig(), 10)
    # A model trained on images without augmentation records nothing (the transform's defaults apply).
    plain = conftest.tiny_cifar_vit()
    unaugmented = BackdoorSafeTrainer(
        model=plain, args=args, train_dataset=prepare_image_dataset(images, processor), **kwargs
    )
    assert recorded_training_augmentation(unaugmented.model) is None
    # The benchmarks and the sanitize recipe hand such a model the raw rows, an older one rows with --crop_padding.
    from benchmarks.common.vision import repair_rows
    from hf_backdoor.data.rows import format_transform

    rows, crop = repair_rows(trainer, images, crop_padding=4)
    assert rows is images and crop == 0
    older, crop = repair_rows(unaugmented, images, crop_padding=2)
    assert crop == 2 and format_transform(older).augmentation_settings() == {"crop_padding": 2, "horizontal_flip": True}


# -- exposure hand-off (EBYD) ------------------------------------------------------------------------------------------

# Tiny settings: one recovery epoch and one threshold for RNP, one n and no fine-tuning for NWC; max_accuracy_drop=1.0
# so a random model's threshold choice cannot fail.
FAST = {
    "rnp": lambda: RNPConfig(recovering_epochs=1, batch_size=80, thresholds=(0.5,), max_accuracy_drop=1.0),
    "nwc": lambda: NWCConfig(n_ratios=(0.01,), n_ratio=0.01, finetune_epochs=0, batch_size=80),
}


def _perturbed(model, rows, module="bert.encoder.layer.1.intermediate.dense", seed=0):
    """A stand-in exposed model: ``model`` with the given rows of one Linear moved, everything else identical."""
    exposed = copy.deepcopy(model)
    with torch.no_grad():
        weight = exposed.get_submodule(module).weight
        weight[rows] += torch.randn(len(rows), weight.shape[1], generator=torch.Generator().manual_seed(seed))
    return exposed


def _exposure(model, exposed=True):
    from hf_backdoor.defenses import ExposureResult

    return ExposureResult(
        model=model,
        method="cul",
        backdoor_label=1,
        label_shares=[0.1, 0.9],
        score=0.64,
        share_variance=0.16,
        exposed=exposed,
        clean_accuracy_before=0.9,
        clean_accuracy_after=0.1 if exposed else 0.85,
        learning_rate=1e-5,
        num_clean_rows=100,
        wall_s=1.5,
    )


@pytest.fixture
def no_unlearning(monkeypatch):
    """RNP's and NWC's own clean unlearning (both run it through the shared repair step), made to fail loudly if
    anything calls it."""
    from hf_backdoor.defenses._shared import repair

    def forbidden(*args, **kwargs):
        raise AssertionError("unlearn called")

    monkeypatch.setattr(repair, "unlearn", forbidden)


@pytest.mark.parametrize("name", ["rnp", "nwc"])
def test_exposed_model_replaces_the_defenses_own_unlearning(tmp_path, tokenizer, clean_rows, no_unlearning, name):
    trainer = _trainer(tmp_path, tiny_bert(), tokenizer)
    before = _state(trainer.model)
    # Without `exposed` the defense does call its unlearning (so the patch is on the path that runs)...
    with pytest.raises(AssertionError, match="unlearn called"):
        trainer.sanitize(clean_rows, FAST[name]())
    assert _same_state(trainer.model, before)

    # ... and with it, it does not.
    exposed = _perturbed(trainer.model, [3, 7])
    exposed_state = _state(exposed)
    _, report = trainer.sanitize(clean_rows, FAST[name](), exposed=_exposure(exposed))
    assert report["unlearned_by"] == "exposure (cul)" and report["exposure_method"] == "cul"
    assert report["exposure_clean_accuracy_before"] == 0.9 and report["exposure_clean_accuracy_after"] == 0.1
    assert report["exposure_exposed"] is True and report["exposure_wall_s"] == 1.5
    assert 0 <= report["exposed_holdout_accuracy"] <= 1 and "exposure" in report["unlearning_note"]
    assert report["unlearning_history"] == [] and report["unlearning_epochs"] == 0
    assert report["clean_threshold"] is None and "unlearning" not in report["timings_s"]
    assert report == json.loads((tmp_path / f"sanitize_report_{name}.json").read_text())
    # The caller's exposed model comes back as it was: not frozen (RNP freezes the model it recovers masks on).
    assert _same_state(exposed, exposed_state) and all(p.requires_grad for p in exposed.parameters())


def test_nwc_ranks_the_neurons_the_exposed_model_moved(tmp_path, tokenizer, clean_rows, no_unlearning):
    trainer = _trainer(tmp_path, tiny_bert(), tokenizer)
    undefended = _state(trainer.model)
    layer1, layer0 = "bert.encoder.layer.1.intermediate.dense", "bert.encoder.layer.0.attention.self.query"
    cases = [
        (_exposure(_perturbed(trainer.model, [3, 7], layer1)), layer1, {3, 7}),
        (_perturbed(trainer.model, [10, 20], layer0, seed=1), layer0, {10, 20}),  # a bare model works too
    ]
    for exposed, module, rows in cases:
        trainer.model.load_state_dict(undefended)
        _, report = trainer.sanitize(clean_rows, FAST["nwc"](), exposed=exposed)
        top = report["top_neurons"]
        # Exactly the moved rows lead (every other row did not change at all, so its NWC is 0).
        assert {(t["module"], t["row"]) for t in top[:2]} == {(module, r) for r in rows}
        assert all(t["nwc"] > 0 for t in top[:2]) and all(t["nwc"] == 0 for t in top[2:])
    assert report["unlearned_by"] == "exposure (given model)" and report["exposure_clean_accuracy_after"] is None


def test_rnp_masks_fall_on_the_units_the_exposed_model_relies_on(tmp_path, tokenizer, clean_rows, no_unlearning):
    """Two exposed models, each with two different FFN units of layer 1 sabotaged (their output weights scrambled, as
    in the recovery test above): the recovered masks fall on that model's units, so the masks follow the exposure."""
    model = tiny_bert()
    with torch.no_grad():
        model.classifier.weight.mul_(50)  # confident logits: a random model's mask gradients are otherwise ~1e-5
    trainer = _trainer(tmp_path, model, tokenizer)
    undefended = _state(model)
    # One short epoch at a large mask learning rate, one threshold: seconds, and the masks still move visibly.
    config = RNPConfig(
        units=("ffn",), recovering_epochs=1, recovering_lr=20.0, batch_size=20, thresholds=(0.5,), max_accuracy_drop=1
    )
    lowest = []
    for broken, seed in (([3, 7], 0), ([40, 60], 1)):
        exposed = copy.deepcopy(model)
        with torch.no_grad():
            fc2 = exposed.bert.encoder.layer[1].output.dense.weight
            fc2[:, broken] += torch.randn(fc2.shape[0], 2, generator=torch.Generator().manual_seed(seed)) * 5
        trainer.model.load_state_dict(undefended)
        _, report = trainer.sanitize(clean_rows, config, exposed=exposed)
        layer1 = np.asarray(report["mask_values"][64:])  # groups: layer0.ffn (64 units), layer1.ffn (64)
        assert layer1[broken].min() < np.delete(layer1, broken).min() - 0.02
        lowest.append(int(layer1.argmin()))
    assert lowest[0] in (3, 7) and lowest[1] in (40, 60)


@pytest.mark.parametrize("config", [NADConfig(), FinetuneConfig(), "nad", {"name": "finetune"}])
def test_defenses_without_unlearning_refuse_an_exposed_model(tmp_path, tokenizer, clean_rows, config):
    trainer = _trainer(tmp_path, tiny_bert(), tokenizer)
    before = _state(trainer.model)
    exposed = _exposure(_perturbed(trainer.model, [3]))
    with pytest.raises(ValueError, match="accepted by nwc, rnp only"):
        trainer.sanitize(clean_rows, config, exposed=exposed)
    # Checked before anything else: even a clean set that would fail on its own gets this error.
    with pytest.raises(ValueError, match="no clean-unlearning step"):
        sanitize_model(trainer, clean_rows.select(range(5)), config, exposed=exposed.model)
    assert _same_state(trainer.model, before) and not list(tmp_path.glob("sanitize_report_*.json"))


def test_a_mismatched_exposed_model_raises_and_leaves_the_model_untouched(tmp_path, tokenizer, clean_rows):
    trainer = _trainer(tmp_path, tiny_bert(), tokenizer)
    before = _state(trainer.model)
    narrow = BertForSequenceClassification(
        BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=48,
            max_position_embeddings=64,
            num_labels=2,
        )
    )
    cases = [
        (tiny_bert(layers=1), "'bert.encoder.layer.1.attention.self.query.weight' .* missing"),
        (narrow, r"'bert.encoder.layer.0.intermediate.dense.weight' has shape \(48, 32\) .* \(64, 32\)"),
        (_exposure(tiny_bert(layers=3)), "has a parameter 'bert.encoder.layer.2"),
        (trainer.model, "the trainer's own model"),
    ]
    for exposed, match in cases:
        for name in ("rnp", "nwc"):
            with pytest.raises(ValueError, match=match):
                trainer.sanitize(clean_rows, FAST[name](), exposed=exposed)
    with pytest.raises(TypeError, match="ExposureResult"):
        trainer.sanitize(clean_rows, FAST["rnp"](), exposed=before)
    assert _same_state(trainer.model, before) and not list(tmp_path.glob("sanitize_report_*.json"))


def test_an_exposure_that_did_not_expose_warns(tmp_path, tokenizer, clean_rows):
    trainer = _trainer(tmp_path, tiny_bert(), tokenizer)
    with pytest.warns(UserWarning, match="did not expose the model"):
        _, report = trainer.sanitize(
            clean_rows, FAST["nwc"](), exposed=_exposure(_perturbed(trainer.model, [1]), exposed=False)
        )
    assert report["exposure_exposed"] is False


@pytest.mark.filterwarnings("ignore:The exposure")  # a random tiny model may not expose in one epoch
def test_a_real_exposure_hands_over(tmp_path, tokenizer, clean_rows, no_unlearning):
    from hf_backdoor.defenses import ExposeConfig

    trainer = _trainer(tmp_path, tiny_bert(), tokenizer)
    exposure = trainer.expose(clean_rows, ExposeConfig(epochs=1, escalate=0, batch_size=50, learning_rate=1e-2))
    _, report = trainer.sanitize(clean_rows, FAST["nwc"](), exposed=exposure)
    assert report["unlearned_by"] == "exposure (cul)"
    assert report["exposure_clean_accuracy_after"] == exposure.clean_accuracy_after
    assert report["top_neurons"][0]["nwc"] > 0


# -- the one protocol: registry, refusals, rendering ----------------------------------------------------------------------


def test_repairs_are_registered_repair_stage_defenses():
    repairs = {"rnp": RNPDefense, "nad": NADDefense, "nwc": NWCDefense, "finetune": FinetuneDefense}
    for name, defense_class in repairs.items():
        entry = defense_entry(name)
        assert entry.method_class is defense_class and defense_class.stage == "repair"
        assert issubclass(entry.config_class, SanitizeConfig) and entry.config_class.name == name
        helps = entry.config_class.field_help()
        assert "max_holdout_drop" in helps and all(helps.values()), [k for k, v in helps.items() if not v]
        assert SANITIZERS[name] == entry  # the read-only view of the registry sanitize_model runs from
    assert set(repairs) <= set(SANITIZERS) and "btu" not in SANITIZERS and "expose" not in SANITIZERS
    assert exposed_defenses() == ["nwc", "rnp"]
    with pytest.raises(TypeError):
        SANITIZERS["anp"] = SANITIZERS["rnp"]


def test_training_stage_defenses_and_the_exposure_are_refused_with_where_they_run(tmp_path, tokenizer, clean_rows):
    trainer = _trainer(tmp_path, tiny_bert(), tokenizer)
    before = _state(trainer.model)
    with pytest.raises(ValueError, match=r"BTU runs during training: pass it to BackdoorSafeTrainer\(defense=...\)"):
        trainer.sanitize(clean_rows, BTUConfig())
    with pytest.raises(ValueError, match="ABL runs during training"):
        sanitize_model(trainer, clean_rows, {"name": "abl"})
    with pytest.raises(ValueError, match=r"call `trainer.expose\(clean_dataset, ExposeConfig"):
        trainer.sanitize(clean_rows, ExposeConfig())
    assert _same_state(trainer.model, before) and not list(tmp_path.glob("sanitize_report_*.json"))


# Cheap settings per repair; RNP and NWC get an exposed model, so no clean unlearning has to converge.
CHEAP = {
    "rnp": (FAST["rnp"], True),
    "nwc": (FAST["nwc"], True),
    "nad": (lambda: NADConfig(teacher_epochs=1, epochs=1, batch_size=40), False),
    "finetune": (lambda: FinetuneConfig(epochs=1, batch_size=40), False),
}


@pytest.mark.parametrize("name", sorted(CHEAP))
def test_each_repair_renders_its_saved_report(tmp_path, tokenizer, clean_rows, name):
    make_config, with_exposed = CHEAP[name]
    trainer = _trainer(tmp_path, tiny_bert(), tokenizer)
    exposed = _perturbed(trainer.model, [3, 7]) if with_exposed else None
    trainer.sanitize(clean_rows, make_config(), exposed=exposed)
    report = json.loads((tmp_path / f"sanitize_report_{name}.json").read_text())
    defense_class = defense_class_for_report(report)
    assert defense_class is defense_entry(name).method_class

    section = defense_class.card_section(report)
    assert f"Held-out clean accuracy: {report['holdout_accuracy_before']:.3f} -> " in section
    assert f"with {report['num_fit_rows']} clean rows" in section
    findings = {
        "rnp": lambda r: f"Pruned **{r['num_pruned']}** of {r['num_units']} units",
        "nwc": lambda r: f"Zeroed **{r['zeroing_zeroed_weights']}** weights",
        "nad": lambda r: f"encoder layers {r['layers']}",
        "finetune": lambda r: "Fine-tuned 1 epoch(s) on the clean rows",
    }
    assert findings[name](report) in section
    if with_exposed:
        assert "replaced by the exposure (given model) model (EBYD)" in section
    limits = defense_class.card_limits(report)
    assert f"{report['num_holdout_rows']} held-out clean rows" in limits[0] and len(limits) >= 2
    summary = defense_class.console_summary(report)
    assert summary[-1].startswith(f"{name.upper()}: held-out clean accuracy")
    assert defense_class.report_scalars(report)["holdout_accuracy_after"] == report["holdout_accuracy_after"]

    figures = defense_class.figures(report, tmp_path / "rendered")
    paths = {figure.path for figure in figures}
    expected = {
        "rnp": {"figures/rnp_holdout_accuracy.png", "figures/mask_histogram.png", "figures/rnp_threshold_sweep.png"},
        "nwc": {"figures/nwc_n_sweep.png"},  # no unlearning (exposed) and no fine-tuning epochs: no accuracy curve
        "nad": {"figures/nad_holdout_accuracy.png"},
        "finetune": {"figures/finetune_holdout_accuracy.png"},
    }
    assert paths == expected[name]
    assert all((tmp_path / "rendered" / path).stat().st_size > 0 for path in paths)
    # A report missing every field (an older or truncated file) still renders.
    bare = {"defense": name}
    assert isinstance(defense_class.card_section(bare), str) and defense_class.figures(bare, tmp_path / "bare") == []


# -- the held-out accuracy guard -------------------------------------------------------------------------------------


@dataclass
class ConstantPredictionConfig(SanitizeConfig):
    """A test repair whose outcome is known exactly: afterwards the classifier predicts ``label`` for every input."""

    label: int = field(default=1, metadata={"help": "The class predicted for every input after the repair."})

    name = "test_constant_prediction"


class ConstantPredictionDefense(RepairDefense):
    def repair(self, context, model):
        _predict_constant(model, self.config.label)
        return {"constant_label": self.config.label}


def _predict_constant(model, label):
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.fill_(-5.0)
        model.classifier.bias[label] = 5.0


@pytest.fixture
def constant_prediction():
    register_defense(ConstantPredictionConfig, ConstantPredictionDefense)  # a third-party repair, as a user adds one
    yield ConstantPredictionConfig
    DEFENSES.pop(ConstantPredictionConfig.name)


def test_a_repair_that_costs_more_than_max_holdout_drop_warns_or_is_refused(
    tmp_path, tokenizer, clean_rows, constant_prediction, caplog
):
    caplog.set_level(logging.WARNING, logger="hf_backdoor")
    model = tiny_bert()
    _predict_constant(model, 0)  # the model to repair answers 0 to everything ...
    trainer = _trainer(tmp_path, model, tokenizer)
    holdout = SanitizeContext(trainer, clean_rows, constant_prediction(), num_labels=2).holdout_labels
    share_of_0 = float(np.mean(holdout == 0))
    assert share_of_0 - (1 - share_of_0) > 0.1  # ... so the repair (answer 1 to everything) costs more than 0.1
    before = _state(model)

    with pytest.warns(UserWarning, match=r"from 0.600 to 0.400, a fall of 0.200, more than max_holdout_drop=0.1"):
        _, report = trainer.sanitize(clean_rows, constant_prediction())  # the default max_holdout_drop
    assert report["holdout_accuracy_before"] == share_of_0 and report["holdout_accuracy_after"] == 1 - share_of_0
    assert report["holdout_drop_exceeded"] is True and report["config"]["max_holdout_drop"] == 0.1
    assert report == json.loads((tmp_path / "sanitize_report_test_constant_prediction.json").read_text())
    assert "more than max_holdout_drop=0.1" in caplog.text  # logged as well as warned
    assert not _same_state(trainer.model, before)  # a warning only: the repair is applied
    assert "fell by more than the allowed 0.1" in RepairDefense.card_section(report)
    assert "more than max_holdout_drop=0.1 lost" in RepairDefense.console_summary(report)[-1]

    # Within the limit, or with no limit: no warning, and the report says so.
    for limit in (0.25, None):
        trainer.model.load_state_dict(before)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            _, report = trainer.sanitize(clean_rows, constant_prediction(max_holdout_drop=limit))
        assert report["holdout_drop_exceeded"] is False

    # refuse_holdout_drop: an error, and neither the model nor a report file changes.
    trainer.model.load_state_dict(before)
    for path in tmp_path.glob("sanitize_report_*.json"):
        path.unlink()
    for replace_model in (True, False):
        with pytest.raises(RuntimeError, match="a fall of 0.200, more than max_holdout_drop=0.1. Refused"):
            trainer.sanitize(clean_rows, constant_prediction(refuse_holdout_drop=True, replace_model=replace_model))
    assert _same_state(trainer.model, before) and not list(tmp_path.glob("sanitize_report_*.json"))
    _, report = trainer.sanitize(clean_rows, constant_prediction(refuse_holdout_drop=True, max_holdout_drop=0.25))
    assert report["holdout_drop_exceeded"] is False and not _same_state(trainer.model, before)
