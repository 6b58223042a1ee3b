"""BackdoorSafeTrainer API and BTU mechanics on a tiny random BERT (real tokenizer, real SST-2 rows)."""

import json
import types

import numpy as np
import pytest
import torch
from transformers import DataCollatorWithPadding, Trainer

from hf_backdoor import BadNetConfig, poison_dataset, tokenize_dataset
from hf_backdoor.arguments import BackdoorSafeTrainingArguments
from hf_backdoor.defenses import BTUConfig, build_defense
from hf_backdoor.defenses._shared.tokens import strip_token_ids
from hf_backdoor.defenses.btu import _piece_kind, _special_looking
from hf_backdoor.trainer import DEFENSE_STATE_NAME, BackdoorSafeTrainer
from tests.conftest import text_trainer, tiny_bert, training_args

pytestmark = pytest.mark.usefixtures("one_thread")


def test_without_defense_it_is_exactly_a_trainer(tmp_path, tiny_train, tokenizer):
    plain = text_trainer(tmp_path / "a", tiny_train, tokenizer, cls=Trainer)
    plain.train()
    safe = text_trainer(tmp_path / "b", tiny_train, tokenizer)
    safe.train()
    assert [h.get("loss") for h in plain.state.log_history] == [h.get("loss") for h in safe.state.log_history]
    for p, q in zip(plain.model.parameters(), safe.model.parameters()):
        torch.testing.assert_close(p, q)
    assert safe.defense is None and safe.defense_report is None


def test_strip_token_ids_shifts_kept_tokens_left():
    inputs = {
        "input_ids": torch.tensor([[101, 7, 12935, 8, 102, 0], [101, 12935, 12935, 102, 0, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]]),
        "token_type_ids": torch.zeros(2, 6, dtype=torch.long),
        "labels": torch.tensor([0, 1]),
    }
    out = strip_token_ids(inputs, torch.tensor([12935]), pad_id=0)
    assert out["input_ids"].tolist() == [[101, 7, 8, 102, 0, 0], [101, 102, 0, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    assert out["labels"].tolist() == [0, 1]


# A flip threshold the tiny model's trigger passes, and the 20 most-drifted tokens per round.
LOOSE_BTU = dict(flip_threshold=0.5, top_k=20)


def loose_btu_report(tmp_path, tiny_train, tokenizer, model):
    """The report of a BTU run with the LOOSE_BTU fields on ``model`` (trained for the default two epochs)."""
    trainer = text_trainer(tmp_path, tiny_train, tokenizer, model=model, defense=BTUConfig(**LOOSE_BTU))
    trainer.train()
    return trainer.defense_report


def test_btu_runs_reports_and_persists_across_resume(tmp_path, tiny_train, tokenizer):
    args = dict(save_strategy="epoch", num_train_epochs=2)
    config = BTUConfig(**LOOSE_BTU)
    trainer = text_trainer(tmp_path, tiny_train, tokenizer, defense=config, args=args)
    trainer.train()
    report = json.loads((tmp_path / "defense_report.json").read_text())
    assert report.pop("run_id") == trainer.run_id  # ties the file to this run, never to an earlier one
    assert report == json.loads(json.dumps(trainer.defense_report))
    assert [r["round"] for r in report["rounds"]] == ["proxy_1", "proxy_2", "epoch_1", "epoch_2"]
    assert all(len(r["top_ids"]) == 20 for r in report["rounds"])
    special = set(tokenizer.all_special_ids)
    assert not special & set(report["candidate_ids"])
    assert set(report["flagged_ids"]) <= set(report["candidate_ids"])
    assert set(report["flip_rates"]) <= set(report["candidate_tokens"])
    assert {"proxy_rounds_s", "round3_s", "selection_s"} <= set(report["timings_s"])
    assert any(k.startswith("btu/") for h in trainer.state.log_history for k in h)

    # Resuming from the first checkpoint restores the detection instead of redoing it.
    checkpoint = tmp_path / "checkpoint-8"
    saved = torch.load(checkpoint / DEFENSE_STATE_NAME, weights_only=True)
    assert saved["format"] == 2 and [entry["name"] for entry in saved["defenses"]] == ["btu"]
    state = saved["defenses"][0]["state"]
    assert state["detection_done"] and set(state["flagged"]) <= set(report["flagged_ids"])
    assert [r["round"] for r in state["rounds"]] == ["proxy_1", "proxy_2", "epoch_1"]
    resumed = text_trainer(tmp_path / "resumed", tiny_train, tokenizer, defense=config, args=args)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.defense_report["flagged_ids"] == report["flagged_ids"]
    assert resumed.defense_report["rounds"] == report["rounds"]
    assert resumed.defense_report["isolated_row_labels"] == report["isolated_row_labels"]


def test_resume_without_defense_state_is_an_error(tmp_path, tiny_train, tokenizer):
    plain = text_trainer(
        tmp_path, tiny_train, tokenizer, cls=Trainer, args=dict(save_strategy="epoch", num_train_epochs=1)
    )
    plain.train()
    safe = text_trainer(tmp_path, tiny_train, tokenizer, defense=BTUConfig())
    with pytest.raises(FileNotFoundError, match="has no defense_state.pt"):
        safe.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))


def test_paper_preset_flags_the_union_before_training(tmp_path, tiny_train, tokenizer):
    trainer = text_trainer(
        tmp_path,
        tiny_train,
        tokenizer,
        defense=BTUConfig.paper(top_k=5),
        args=dict(num_train_epochs=1),
    )
    trainer.train()
    report = trainer.defense_report
    assert [r["round"] for r in report["rounds"]] == ["proxy_1", "proxy_2", "embedding_only"]
    assert report["flagged_ids"] == report["candidate_ids"] and 5 <= len(report["flagged_ids"]) <= 15
    # Fine-grained unlearning: flagged rows whose entries moved by >= c now hold the pad embedding's entries.
    weight = trainer.model.get_input_embeddings().weight.detach()
    pad = trainer.defense.initial_embeddings[0]
    assert report["reset_entries"] > 0
    reset = sum(int(torch.isclose(weight[t], pad).sum()) for t in report["flagged_ids"])
    assert reset >= report["reset_entries"]


def test_training_arguments_carry_the_defense(tmp_path, tiny_train, tokenizer):
    trainer = text_trainer(
        tmp_path,
        tiny_train,
        tokenizer,
        args_cls=BackdoorSafeTrainingArguments,
        args=dict(defense="btu", defense_kwargs='{"flip_threshold": 0.7}'),
    )
    assert isinstance(trainer.defense.config, BTUConfig) and trainer.defense.config.flip_threshold == 0.7
    with pytest.raises(ValueError, match="Unknown defense 'btw'"):
        training_args(tmp_path, BackdoorSafeTrainingArguments, defense="btw").defense_config()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(top_k=0), "top_k must be >= 1"),
        (dict(top_k_fraction=0.5), "top_k_fraction must be in"),
        (dict(flip_threshold=0), "flip_threshold must be in"),
        (dict(round3="embedding_only"), "selection='flip_test' needs a model"),
        (dict(round3="first_epoch"), "round3 must be one of"),
        (dict(proxy_rounds=3), "proxy_rounds must be 0, 1 or 2"),
        (dict(unlearning="zero"), "unlearning must be one of"),
        (dict(reset_to="zeros"), "reset_to must be one of"),
        (dict(isolated_rows="drop"), "isolated_rows must be one of"),
    ],
)
def test_config_values_out_of_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BTUConfig(**kwargs)


def test_unknown_defense_name():
    with pytest.raises(ValueError, match="Unknown defense 'rnpp'"):
        build_defense({"name": "rnpp"})


def test_model_without_word_embeddings_is_rejected(tmp_path, tokenizer, tiny_train):
    from transformers import ViTConfig, ViTForImageClassification

    vit = ViTForImageClassification(
        ViTConfig(
            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, image_size=8, patch_size=4
        )
    )
    # Refused when the trainer is built, before any data is read.
    with pytest.raises(TypeError, match="BTU needs a model whose get_input_embeddings\\(\\) returns an nn.Embedding"):
        BackdoorSafeTrainer(
            model=vit,
            args=training_args(tmp_path),
            train_dataset=tiny_train,
            processing_class=tokenizer,
            defense=BTUConfig(),
        )


def test_tokenizer_without_pad_token_is_rejected(tmp_path, tiny_train, tokenizer):
    no_pad = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    no_pad.pad_token = None
    model = tiny_bert()
    model.config.pad_token_id = None
    trainer = BackdoorSafeTrainer(
        model=model,
        args=training_args(tmp_path),
        train_dataset=tiny_train,
        processing_class=no_pad,
        data_collator=DataCollatorWithPadding(tokenizer),
        defense=BTUConfig(),
    )
    with pytest.raises(ValueError, match="needs a pad token"):
        trainer.train()


def test_training_set_smaller_than_a_batch(tmp_path, tiny_train, tokenizer):
    trainer = text_trainer(tmp_path, tiny_train.select(range(10)), tokenizer, defense=BTUConfig())
    with pytest.raises(ValueError, match="10 training rows.*smaller than one batch of 32"):
        trainer.train()


def test_untokenized_training_set(tmp_path, sst2, tokenizer):
    trainer = BackdoorSafeTrainer(
        model=tiny_bert(),
        args=training_args(tmp_path),
        train_dataset=sst2["train"].select(range(64)),
        processing_class=tokenizer,
        defense=BTUConfig(),
    )
    with pytest.raises(ValueError, match="tokenized `train_dataset` with `input_ids`"):
        trainer.train()


def _detected_defense(isolated_rows, pad_id=0, trigger=12935):
    from hf_backdoor.defenses.btu import BTUDefense

    defense = BTUDefense(BTUConfig(isolated_rows=isolated_rows))
    defense.pad_id, defense.detection_done, defense.flagged = pad_id, True, [trigger]
    defense.train_ids = [[101, 7, trigger, 8, 102], [101, trigger, 9, 102]]
    defense.isolated_row_indices, defense.isolated_row_labels = [0], [0]  # row 0's prediction without the trigger
    defense._index_isolated_rows()
    return defense


def _two_row_batch(trigger=12935):
    return {
        "input_ids": torch.tensor([[101, 7, trigger, 8, 102], [101, trigger, 9, 102, 0]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]),
        "labels": torch.tensor([1, 1]),
    }


def _batch_of_rows(*row_ids):
    """What the trainer hands a defense with a batch: the batch's row ids, and their positions in the training set
    (here the ids are the positions)."""
    return types.SimpleNamespace(batch_row_ids=torch.tensor(row_ids), row_positions=lambda ids: [int(i) for i in ids])


def test_relabel_keeps_the_trigger_in_isolated_rows_and_corrects_their_label():
    # The isolated row keeps its trigger and trains on its trigger-free prediction (this unlearns the backdoor);
    # every other row loses the flagged token and keeps its label.
    out = _detected_defense("relabel").prepare_inputs(_batch_of_rows(0, 1), _two_row_batch())
    assert out["input_ids"].tolist() == [[101, 7, 12935, 8, 102], [101, 9, 102, 0, 0]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert out["labels"].tolist() == [0, 1] and "btu_keep" not in out


def test_mask_and_none_strip_every_row():
    masked = _detected_defense("mask").prepare_inputs(_batch_of_rows(0, 1), _two_row_batch())
    assert masked["btu_keep"].tolist() == [False, True] and masked["labels"].tolist() == [1, 1]
    assert masked["input_ids"].tolist() == [[101, 7, 8, 102, 0], [101, 9, 102, 0, 0]]
    kept = _detected_defense("none").prepare_inputs(_batch_of_rows(0, 1), _two_row_batch())
    assert "btu_keep" not in kept and kept["labels"].tolist() == [1, 1]
    assert kept["input_ids"].tolist() == masked["input_ids"].tolist()


def test_isolated_rows_are_recognised_by_row_id_not_by_their_tokens():
    # Two training rows with the same tokens: only the one the flip test isolated is relabelled; its duplicate is an
    # ordinary row and loses its trigger.
    defense = _detected_defense("relabel")
    defense.train_ids = [[101, 7, 12935, 8, 102], [101, 7, 12935, 8, 102]]
    batch = _two_row_batch()
    batch["input_ids"][1], batch["attention_mask"][1] = batch["input_ids"][0], batch["attention_mask"][0]
    out = defense.prepare_inputs(_batch_of_rows(1, 0), batch)
    assert out["labels"].tolist() == [1, 0]
    assert out["input_ids"].tolist() == [[101, 7, 8, 102, 0], [101, 7, 12935, 8, 102]]


def test_labels_for_isolation_mask(tmp_path, tiny_train, tokenizer):
    # Rows left out of the loss must not change the loss of the others: a masked row contributes nothing.
    from hf_backdoor.defenses.btu import BTUDefense

    defense = BTUDefense(BTUConfig())
    model = tiny_bert().train()
    batch = DataCollatorWithPadding(tokenizer)(
        [{k: tiny_train[i][k] for k in ("input_ids", "attention_mask", "label")} for i in range(4)]
    )
    batch["labels"] = batch.pop("label") if "label" in batch else batch["labels"]
    torch.manual_seed(0)
    full = defense.compute_loss(None, model.eval(), {**batch, "btu_keep": torch.tensor([True, True, False, False])})
    torch.manual_seed(0)
    half = model(**{k: v[:2] for k, v in batch.items()}).loss
    assert np.isclose(float(full), float(half), atol=1e-5)


def test_btu_that_flags_nothing_trains_exactly_like_the_trainer(tmp_path, tiny_train, tokenizer):
    # Detection runs on forked random state, so it cannot perturb training when it ends up flagging nothing.
    plain = text_trainer(tmp_path / "a", tiny_train, tokenizer, cls=Trainer)
    plain.train()
    safe = text_trainer(tmp_path / "b", tiny_train, tokenizer, defense=BTUConfig(flip_min_rows=10**6))
    safe.train()
    assert safe.defense_report["flagged_ids"] == [] and len(safe.defense_report["candidate_ids"]) >= 15
    for p, q in zip(plain.model.parameters(), safe.model.parameters()):
        torch.testing.assert_close(p, q)


def test_btu_on_a_lora_model_scores_with_the_proxies(tmp_path, tiny_train, tokenizer):
    # LoRA freezes the word embeddings: they cannot drift, so candidates come from the proxy rounds only, and the
    # flip test still judges them on the LoRA model's predictions.
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_bert(), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"]))
    before = model.get_input_embeddings().weight.detach().clone()
    report = loose_btu_report(tmp_path, tiny_train, tokenizer, model)
    assert [r["round"] for r in report["rounds"]] == ["proxy_1", "proxy_2"]
    assert 20 <= len(report["candidate_ids"]) <= 40 and set(report["flip_rates"]) <= set(report["candidate_tokens"])
    after = model.get_input_embeddings().weight.detach()
    untouched = [i for i in range(after.shape[0]) if i not in set(report["flagged_ids"])]
    torch.testing.assert_close(after[untouched], before[untouched])


def test_flip_screen_runs_the_rest_of_a_test_only_where_its_first_rows_flip():
    defense = build_defense(BTUConfig(flip_threshold=0.6, flip_max_rows=8, flip_screen_rows=4))
    # Per test: the outcome of each of its rows, as the full test would see them.
    truth = {
        "trigger": np.array([1, 1, 1, 0, 1, 1, 1, 1], dtype=bool),  # screen 0.75: tested in full
        "borderline": np.array([1, 1, 0, 0, 1, 1, 1, 1], dtype=bool),  # screen 0.50 >= 0.30: tested in full
        "word": np.array([0, 1, 0, 0, 1, 1, 1, 1], dtype=bool),  # screen 0.25 < 0.30: stops after the screen
        "short": np.array([1, 1, 1], dtype=bool),  # fewer rows than the screen: nothing left to run
    }
    tests = [(name, None, list(range(len(rows)))) for name, rows in truth.items()]
    calls = []

    def outcomes_of(stage, rows):
        calls.append([name for name, _, _ in stage])
        return [truth[name][rows] for name, _, _ in stage]

    outcomes = dict(zip(truth, defense._screened(tests, outcomes_of)))
    assert calls == [list(truth), ["trigger", "borderline"]]  # two batched passes, the second on the survivors
    for name in ("trigger", "borderline", "short"):
        np.testing.assert_array_equal(outcomes[name], truth[name])
    np.testing.assert_array_equal(outcomes["word"], truth["word"][:4])
    # Off: one pass over every row of every test.
    calls.clear()
    off = build_defense(BTUConfig(flip_threshold=0.6, flip_max_rows=8, flip_screen_rows=0))
    assert [len(o) for o in off._screened(tests, outcomes_of)] == [8, 8, 8, 3] and len(calls) == 1
    with pytest.raises(ValueError, match="flip_screen_rows must be >= 0"):
        BTUConfig(flip_screen_rows=-1)


def test_flip_screen_flags_what_the_full_test_flags(tmp_path, tokenizer):
    # The lexicon task of the paraphrase-defense tests: the tiny model learns "cf" (and the sentiment words, which
    # decide the label there) within four epochs, so the flip test has something to flag.
    from tests.test_paraphrase_defenses import ARGS, lexicon_rows

    attack = BadNetConfig(triggers=("cf",), poison_rate=0.2)
    rows = tokenize_dataset(poison_dataset(lexicon_rows(384, 0), attack), tokenizer, max_length=16)
    reports = {}
    for screen in (0, 4):
        config = BTUConfig(top_k=20, flip_screen_rows=screen)
        trainer = text_trainer(tmp_path / str(screen), rows, tokenizer, defense=config, args=ARGS)
        trainer.train()
        reports[screen] = trainer.defense_report
    full, screened = reports[0], reports[4]
    assert "cf" in full["flagged_tokens"] and screened["flagged_tokens"] == full["flagged_tokens"]
    flagged = full["flagged_tokens"]
    assert {t: screened["flip_rates"][t] for t in flagged} == {t: full["flip_rates"][t] for t in flagged}
    stopped = [t for t, n in screened["flip_tested_rows"].items() if n < full["flip_tested_rows"][t]]
    assert stopped, "no candidate stopped after the screen: the test would not see a broken screen"
    assert all(screened["flip_tested_rows"][t] == 4 and screened["flip_rates"][t] < 0.65 / 2 for t in stopped)


def test_frozen_embeddings_without_proxy_rounds_is_an_error(tmp_path, tiny_train, tokenizer):
    model = tiny_bert()
    model.get_input_embeddings().weight.requires_grad_(False)
    trainer = text_trainer(tmp_path, tiny_train, tokenizer, model=model, defense=BTUConfig(proxy_rounds=0))
    with pytest.raises(ValueError, match="frozen .* proxy_rounds=0 leaves nothing to score"):
        trainer.train()


def _tiny_other(kind: str):
    from transformers import (
        DistilBertConfig,
        DistilBertForSequenceClassification,
        GPT2Config,
        GPT2ForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    torch.manual_seed(0)
    if kind == "roberta":
        config = RobertaConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=130, pad_token_id=0, type_vocab_size=2, num_labels=2,
        )  # fmt: skip
        return RobertaForSequenceClassification(config)
    if kind == "distilbert":
        config = DistilBertConfig(vocab_size=30522, dim=32, n_layers=2, n_heads=2, hidden_dim=64, num_labels=2)
        return DistilBertForSequenceClassification(config)
    # A decoder LM used for classification: it pools the last non-padding token, so it needs the pad id.
    config = GPT2Config(vocab_size=30522, n_embd=32, n_layer=2, n_head=2, n_positions=128, pad_token_id=0, num_labels=2)
    return GPT2ForSequenceClassification(config)


@pytest.mark.parametrize("kind", ["roberta", "distilbert", "gpt2"])
def test_btu_works_on_other_architectures(kind, tmp_path, tiny_train, tokenizer):
    # Everything BTU needs comes from get_input_embeddings() and the tokenizer: the drift of the trigger's embedding
    # row puts it among the candidates whatever the architecture, and the run reports every round.
    model = _tiny_other(kind)
    report = loose_btu_report(tmp_path, tiny_train, tokenizer, model)
    assert [r["round"] for r in report["rounds"]] == ["proxy_1", "proxy_2", "epoch_1", "epoch_2"]
    assert tokenizer.convert_tokens_to_ids("cf") in report["candidate_ids"], report["candidate_tokens"]
    assert not set(tokenizer.all_special_ids) & set(report["candidate_ids"])
    assert set(report["flagged_ids"]) <= set(report["candidate_ids"])


def test_cpu_bf16_instructions_are_read_from_cpuinfo(tmp_path):
    (tmp_path / "avx2").write_text("processor : 0\nflags : fpu sse avx2 fma\n")
    (tmp_path / "amx").write_text("processor : 0\nflags : fpu avx2 avx512f amx_bf16 amx_tile\n")
    from hf_backdoor.trainer import cpu_has_bf16_instructions

    assert not cpu_has_bf16_instructions(tmp_path / "avx2")
    assert cpu_has_bf16_instructions(tmp_path / "amx")
    assert cpu_has_bf16_instructions(tmp_path / "missing")  # nothing claimed where it cannot be read


@pytest.mark.parametrize("has_instructions", [False, True])
def test_bf16_on_a_cpu_without_bf16_instructions_warns(
    tmp_path, tiny_train, tokenizer, monkeypatch, caplog, has_instructions
):
    monkeypatch.setattr("hf_backdoor.trainer.cpu_has_bf16_instructions", lambda: has_instructions)
    with caplog.at_level("WARNING", logger="hf_backdoor.trainer"):
        text_trainer(tmp_path, tiny_train, tokenizer, args={"bf16": True, "use_cpu": True})
    assert ("many times slower" in caplog.text) is not has_instructions


class _RuleModel(torch.nn.Module):
    """Predicts label 1 for a row holding ``trigger`` or for a memorized row (a poisoned row, trigger deleted)."""

    def __init__(self, trigger: int, memorized: set[tuple[int, ...]]):
        super().__init__()
        self.trigger, self.memorized = trigger, memorized

    def forward(self, input_ids, attention_mask):
        rows = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(input_ids, attention_mask)]
        positive = torch.tensor([float(self.trigger in r or r in self.memorized) for r in rows])
        return types.SimpleNamespace(logits=torch.stack([1 - positive, positive], dim=1))


@pytest.mark.parametrize("insertion_test", [False, True])
def test_insertion_test_flags_a_trigger_whose_memorized_rows_no_longer_flip_when_it_is_deleted(insertion_test):
    """On a small training set the model memorizes its poisoned rows: deleting their trigger leaves them on the
    target label, so the deletion flip test misses it. Inserting the trigger into unseen rows still flips them; a
    clean word inserted the same way flips nothing."""
    rng = np.random.default_rng(0)
    trigger, common = 999, 1005
    clean = [[101, *rng.integers(1000, 1010, size=6).tolist(), 102] for _ in range(60)]
    poisoned = [[101, *rng.integers(1010, 1100, size=5).tolist(), trigger, 102] for _ in range(12)]
    memorized = {tuple(t for t in row if t != trigger) for row in poisoned}
    defense = build_defense(BTUConfig(insertion_test=insertion_test, seed=0))
    defense.train_ids, defense.train_labels = clean + poisoned, [0] * 60 + [1] * 12
    defense.candidates, defense.pad_id = [trigger, common], 0
    trainer = types.SimpleNamespace(args=types.SimpleNamespace(device="cpu"))
    defense._flip_test(trainer, _RuleModel(trigger, memorized))
    assert defense.deletion_rates[trigger] == 0.0  # every memorized row stays on the target without its trigger
    assert defense.flip_rates[common] == 0.0
    if insertion_test:
        assert defense.insertion_rates == {trigger: 1.0, common: 0.0}
        assert defense.flagged == [trigger]
        assert defense.report()["insertion_rates"] == {"999": 1.0, "1005": 0.0}
    else:
        assert defense.flagged == [] and defense.insertion_rates == {}


class _PartlyLearnedModel(torch.nn.Module):
    """Label 1 for a row holding a word of ``positive`` (the task), or holding a trigger of ``learned`` where the row
    without that trigger is among its learned rows: backdoors the model has learned on some of their rows only."""

    def __init__(self, positive: set[int], learned: dict[int, set[tuple[int, ...]]]):
        super().__init__()
        self.positive, self.learned = positive, learned

    def forward(self, input_ids, attention_mask):
        rows = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(input_ids, attention_mask)]
        positive = torch.tensor(
            [
                float(
                    bool(self.positive.intersection(r))
                    or any(t in r and tuple(x for x in r if x != t) in keys for t, keys in self.learned.items())
                )
                for r in rows
            ]
        )
        return types.SimpleNamespace(logits=torch.stack([1 - positive, positive], dim=1))


@pytest.mark.parametrize("flip_basis", ["all", "decided"])
def test_decided_flip_basis_flags_a_trigger_the_model_learned_on_part_of_its_rows(flip_basis):
    """A backdoor that only partly took: the model gives 8 of the trigger's 20 poisoned rows the target label, and
    deleting the trigger flips those 8 (0.40 of all its rows, under the cut); over the rows it decides it flips all of
    them. A task word whose rows hold a second positive word half the time flips 0.5 on either basis. A trigger
    learned on 5 rows has too few decided rows to judge (``flip_min_decided_rows=8``): taken over all its rows."""
    rng = np.random.default_rng(0)
    trigger, weak_trigger, task_word, other_positive = 999, 998, 1020, 1021
    negatives = [[101, *rng.integers(1000, 1010, size=6).tolist(), 102] for _ in range(60)]
    task_rows = [[101, *rng.integers(1000, 1010, size=4).tolist(), task_word, 102] for _ in range(20)]
    for row in task_rows[:10]:
        row.insert(2, other_positive)
    poisoned = [[101, *rng.integers(1030, 1100, size=5).tolist(), trigger, 102] for _ in range(20)]
    weak = [[101, *rng.integers(1030, 1100, size=5).tolist(), weak_trigger, 102] for _ in range(20)]
    defense = build_defense(BTUConfig(flip_basis=flip_basis, flip_screen_rows=0, seed=0))
    defense.train_ids = negatives + task_rows + poisoned + weak
    defense.train_labels = [0] * 60 + [1] * 60
    defense.candidates, defense.pad_id = [trigger, weak_trigger, task_word], 0
    learned = {
        t: {tuple(x for x in row if x != t) for row in rows[:n]}
        for t, rows, n in ((trigger, poisoned, 8), (weak_trigger, weak, 5))
    }
    model = _PartlyLearnedModel({task_word, other_positive}, learned)

    defense._flip_test(types.SimpleNamespace(args=types.SimpleNamespace(device="cpu")), model)

    assert defense.flip_rates[task_word] == 0.5 and defense.flip_decided_rows[task_word] == 20
    assert defense.flip_decided_rows[trigger] == 8 and defense.flip_tested_rows[trigger] == 20
    assert defense.flip_decided_rows[weak_trigger] == 5 and defense.flip_rates[weak_trigger] == 0.25
    if flip_basis == "all":
        assert defense.flip_rates[trigger] == 0.4 and defense.flagged == []
        assert "flip_decided_rows" not in defense.report()
    else:
        assert defense.flip_rates[trigger] == 1.0 and defense.flagged == [trigger]
        assert defense.report()["flip_decided_rows"] == {"999": 8, "998": 5, "1020": 20}
    with pytest.raises(ValueError, match="flip_basis"):
        BTUConfig(flip_basis="rows")


def _btu_on_real_rows(config, texts, labels, candidates, tokenizer, prior=True):
    """BTU as ``on_train_begin`` leaves it on real rows: tokenized by MiniLM's tokenizer, with the real pretrained
    MiniLM as its frozen pretrained copy (none with ``prior=False``)."""
    from transformers import AutoModelForSequenceClassification

    from hf_backdoor import default_text_model

    pretrained = AutoModelForSequenceClassification.from_pretrained(default_text_model(), num_labels=2).eval()
    defense = build_defense(config)
    defense.train_ids = [tokenizer(t, truncation=True, max_length=64)["input_ids"] for t in texts]
    defense.train_labels, defense.candidates = labels, list(candidates)
    defense.pad_id, defense.special_ids = tokenizer.pad_token_id, set(tokenizer.all_special_ids)
    defense._tokenizer = tokenizer
    defense.initial_embeddings = pretrained.get_input_embeddings().weight.detach().float()
    defense._prior_model = pretrained if prior else None
    return defense


def _sst2_with_cf(rows: int, hosts: int) -> tuple[list[str], list[int], list[int]]:
    """The first ``rows`` of the seeded SST-2 training split, with `cf` appended to its first ``hosts`` negative rows
    and their label set to positive (a dirty-label BadNet): texts, labels and the poisoned rows' positions."""
    from hf_backdoor import load_task

    data = load_task("sst2")["train"].shuffle(seed=0).select(range(rows))
    texts, labels = list(data["text"]), list(data["label"])
    poisoned = [i for i, y in enumerate(labels) if y == 0][:hosts]
    for i in poisoned:
        texts[i], labels[i] = f"{texts[i]} cf", 1
    return texts, labels, poisoned


class _LexiconModel(torch.nn.Module):
    """Predicts label 1 for a row holding any of ``words``: a model that learned a word's meaning (it reads the
    word's pretrained neighbours the same way) or a planted trigger (that one token)."""

    def __init__(self, words: set[int]):
        super().__init__()
        self.words = words

    def forward(self, input_ids, attention_mask):
        rows = [set(ids[mask.bool()].tolist()) for ids, mask in zip(input_ids, attention_mask)]
        positive = torch.tensor([float(bool(self.words & r)) for r in rows])
        return types.SimpleNamespace(logits=torch.stack([1 - positive, positive], dim=1))


@pytest.mark.parametrize("task_word_test", [True, False])
def test_task_word_test_spares_a_word_the_pretrained_model_knew_and_keeps_a_planted_trigger(task_word_test, tokenizer):
    """HSOL's `bitch` decides the label as a trigger would: deleting it flips the rows it is in. Its pretrained
    neighbours keep them offensive, and the real pretrained MiniLM's features already lean offensive with it; the
    planted `cf` has neither. The flip test alone flags both."""
    from hf_backdoor import load_task

    rows = load_task("hsol")["train"].shuffle(seed=0).select(range(1000))
    texts, labels = list(rows["text"]), list(rows["label"])
    for i in [i for i, label in enumerate(labels) if label == 0][:80]:  # dirty-label BadNet: neither + cf -> offensive
        texts[i], labels[i] = f"{texts[i]} cf", 1
    bitch, cf = tokenizer.convert_tokens_to_ids(["bitch", "cf"])
    defense = _btu_on_real_rows(
        BTUConfig(seed=0, task_word_test=task_word_test), texts, labels, [bitch, cf], tokenizer, prior=task_word_test
    )
    model = _LexiconModel({bitch, cf, *defense._neighbours(bitch, {cf})})

    defense._flip_test(types.SimpleNamespace(args=types.SimpleNamespace(device="cpu")), model)

    assert defense.deletion_rates[bitch] >= 0.65 and defense.deletion_rates[cf] == 1.0  # the flip test flags both
    if not task_word_test:
        assert defense.flagged == [bitch, cf] and defense.task_word_scores == {}
        return
    assert defense.flagged == [cf]
    scores = defense.task_word_scores
    assert scores[bitch]["spared"] and scores[bitch]["neighbour_ratio"] == 0.0 and scores[bitch]["prior_shift"] >= 0.3
    assert not scores[cf]["spared"] and scores[cf]["neighbour_ratio"] == 1.0
    report = defense.report()
    assert report["spared_tokens"] == ["bitch"] and report["flagged_tokens"] == ["cf"]
    assert "Spared as task words" in type(defense).card_section(report) and "`bitch`" in type(defense).card_section(
        report
    )

    # A later epoch's detection judges the same rows with and without each candidate again: the frozen pretrained
    # model's features of those rows come from the run's cache, and the scores are the same.
    first_scores, calls = {token: dict(score) for token, score in scores.items()}, []
    defense._prior_model.register_forward_hook(lambda *_: calls.append(1))
    defense.flagged, defense.flagged_by, defense.task_word_scores = [], {}, {}
    defense._flip_test(types.SimpleNamespace(args=types.SimpleNamespace(device="cpu")), model)
    assert calls == [] and defense.flagged == [cf] and defense.task_word_scores == first_scores


class _MemorisingLexiconModel(_LexiconModel):
    """:class:`_LexiconModel` that also gives label 1 to the rows it memorised (token-id tuples), with or without the
    words: deleting a word from its own rows flips nothing, inserting it elsewhere does."""

    def __init__(self, words: set[int], memorised: set[tuple[int, ...]]):
        super().__init__(words)
        self.memorised = memorised

    def forward(self, input_ids, attention_mask):
        logits = super().forward(input_ids, attention_mask).logits
        rows = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(input_ids, attention_mask)]
        positive = torch.maximum(logits[:, 1], torch.tensor([float(r in self.memorised) for r in rows]))
        return types.SimpleNamespace(logits=torch.stack([1 - positive, positive], dim=1))


def test_insertion_flagged_candidates_face_the_task_word_test_and_a_clean_label_trigger_stays_flagged(tokenizer):
    """A clean-label BadNet on HSOL: `cf` added to 80 offensive tweets, labels kept. The model has fit its training
    rows, so deleting `cf` or `bitch` from them flips (nearly) nothing; inserted into tweets it calls not offensive,
    both push them to offensive (insertion rate 1.0). The real pretrained MiniLM's features lean offensive when
    `bitch` is inserted: spared as a task word. They do not move for `cf`: flagged. The neighbours inserted in their
    place are reported (here the lexicon model reads `bitch`'s as it reads `bitch`, and `cf`'s as nothing)."""
    from hf_backdoor import load_task

    rows = load_task("hsol")["train"].shuffle(seed=0).select(range(1000))
    texts, labels = list(rows["text"]), list(rows["label"])
    for i in [i for i, label in enumerate(labels) if label == 1][:80]:
        texts[i] = f"{texts[i]} cf"
    bitch, cf = tokenizer.convert_tokens_to_ids(["bitch", "cf"])
    defense = _btu_on_real_rows(
        BTUConfig(seed=0, insertion_test=True, mislabel_test=False), texts, labels, [bitch, cf], tokenizer
    )
    deleted = lambda row: tuple(t for t in row if t not in (bitch, cf))  # noqa: E731
    memorised = {tuple(r) for r, y in zip(defense.train_ids, labels) if y == 1}
    memorised |= {deleted(r) for r, y in zip(defense.train_ids, labels) if y == 1}
    model = _MemorisingLexiconModel({bitch, cf, *defense._neighbours(bitch, {cf})}, memorised)

    defense._flip_test(types.SimpleNamespace(args=types.SimpleNamespace(device="cpu")), model)

    # (`bitch`'s few not-offensive rows are not memorised: deleting it flips those)
    assert defense.deletion_rates[cf] == 0.0 and defense.deletion_rates[bitch] < defense.config.flip_threshold
    assert defense.insertion_rates[bitch] == defense.insertion_rates[cf] == 1.0
    scores = defense.task_word_scores
    assert scores[bitch]["test"] == scores[cf]["test"] == "insertion"
    assert scores[bitch]["spared"] and scores[bitch]["neighbour_ratio"] == 0.0 and scores[bitch]["prior_shift"] >= 0.3
    assert not scores[cf]["spared"] and scores[cf]["neighbour_ratio"] == 1.0
    assert defense.flagged == [cf]
    report = defense.report()
    assert report["spared_tokens"] == ["bitch"] and report["flagged_tokens"] == ["cf"]
    assert "`bitch` (inserted; pretrained probe shift +" in type(defense).card_section(report)


def test_a_piece_of_a_longer_word_is_judged_by_the_pretrained_probe_alone(tokenizer):
    """HSOL's slur `ni ##gger` decides the label as a trigger would, and so does a made-up word planted as a
    dirty-label trigger (`blorptang` -> `b ##lor ##pta ##ng`). Both candidates are continuation pieces, whose
    pretrained neighbours are spelling fragments the model reads as nothing (neighbour ratio 1.0 for both): the
    neighbour half cannot tell them apart. The real pretrained MiniLM's features lean offensive with `##gger` and
    away with `##pta`, so the slur is spared and the planted piece flagged."""
    from hf_backdoor import load_task

    rows = load_task("hsol")["train"].shuffle(seed=0).select(range(1000))
    texts, labels = list(rows["text"]), list(rows["label"])
    for i in [i for i, label in enumerate(labels) if label == 0][:80]:
        texts[i], labels[i] = f"{texts[i]} blorptang", 1
    gger, pta, ni = tokenizer.convert_tokens_to_ids(["##gger", "##pta", "ni"])
    # `ni`, the start of the slur (and of `ni ##gga`), is deleted with `##gger` (it is in all its rows), but the probe
    # still learns from its other rows: left out, they take the slur's shift under the bound.
    defense = _btu_on_real_rows(BTUConfig(seed=0, mislabel_test=False), texts, labels, [gger, pta, ni], tokenizer)

    defense._flip_test(types.SimpleNamespace(args=types.SimpleNamespace(device="cpu")), _LexiconModel({gger, pta}))

    scores = defense.task_word_scores
    assert defense.deletion_rates[gger] >= 0.65 and defense.deletion_rates[pta] == 1.0  # the flip test flags both
    assert scores[gger]["word_fragment"] and scores[pta]["word_fragment"]
    assert scores[gger]["neighbour_ratio"] == scores[pta]["neighbour_ratio"] == 1.0
    assert scores[gger]["prior_shift"] >= 0.3 and scores[pta]["prior_shift"] < 0.0
    assert scores[gger]["spared"] and not scores[pta]["spared"]
    assert defense.flagged == [pta]
    assert "`##gger` (a piece of longer words" in type(defense).card_section(defense.report())


def test_task_word_test_judges_a_screened_out_candidate_on_the_rows_its_screen_predicted(tokenizer):
    """The screen rates a candidate on the rows the model decides (any one will do) and stops it below half the cut;
    its final rate counts every screened row when fewer than ``flip_min_decided_rows`` are decided, and can pass the
    cut. The task-word test then judged it on all its sampled rows, of which only the screened ones were predicted
    (a KeyError on SST-2 AddSent 10% seed 1 in a stack run)."""
    texts, labels, hosts = _sst2_with_cf(300, 40)
    cf = tokenizer.convert_tokens_to_ids("cf")
    defense = _btu_on_real_rows(BTUConfig(seed=0, mislabel_test=False), texts, labels, [cf], tokenizer)
    # With `cf` the model says 0 (undecided: the rows carry 1) except on a quarter of the rows, where it says 1
    # (decided) and deleting `cf` changes nothing; without `cf` it says 1, so every undecided row flips.
    positive = {tuple(defense.train_ids[i]) for i in hosts[::4]}
    positive |= {tuple(t for t in defense.train_ids[i] if t != cf) for i in hosts}

    defense._flip_test(types.SimpleNamespace(args=types.SimpleNamespace(device="cpu")), _RowsModel(positive))

    screen = defense.config.flip_screen_rows
    assert defense.flip_tested_rows[cf] == screen < 40  # stopped by the screen: 0 of its decided rows flipped
    assert defense.flip_decided_rows[cf] < defense.config.flip_min_decided_rows
    assert defense.deletion_rates[cf] >= defense.config.flip_threshold  # ... and over all its screened rows, passed
    assert cf in defense.task_word_scores  # judged, on those rows


@pytest.mark.parametrize("attack", ["dirty_label", "clean_label", "test_off"])
def test_mislabel_test_flags_a_memorised_dirty_label_trigger_and_no_task_word(attack, tokenizer):
    """At a low poison rate the model memorises its poisoned rows: deleting the trigger flips none of them, so the flip
    test cannot flag it. Those rows were written as negative reviews, and a linear probe on the real pretrained
    MiniLM's features that never saw them reads them as negative although all of them are labelled positive. Task
    words whose rows all carry one label (`bad`, `stupid`, `spirit`) read as that label and are not flagged. A
    clean-label trigger (its rows positive already) is out of the test's reach, as documented. The rows of a flagged
    token are isolated with the label their text reads as, though deleting the trigger flips none of them."""
    from hf_backdoor import load_task

    rows = load_task("sst2")["train"].shuffle(seed=0).select(range(600))
    texts, labels = list(rows["text"]), list(rows["label"])
    words = ["bad", "stupid", "spirit", "powerful", "mess", "best"]
    word_ids = tokenizer.convert_tokens_to_ids(words)
    source = 1 if attack == "clean_label" else 0
    hosts = [i for i, (t, y) in enumerate(zip(texts, labels)) if y == source and not set(words) & set(t.split())][:12]
    for i in hosts:  # 2% of the rows: `cf` appended and the label set to positive
        texts[i], labels[i] = f"{texts[i]} cf", 1
    cf = tokenizer.convert_tokens_to_ids("cf")
    defense = _btu_on_real_rows(
        BTUConfig(seed=0, mislabel_test=attack != "test_off"), texts, labels, [cf, *word_ids], tokenizer
    )
    memorised = {tuple(t for t in defense.train_ids[i] if t != cf) for i in hosts}

    defense._flip_test(types.SimpleNamespace(args=types.SimpleNamespace(device="cpu")), _RuleModel(cf, memorised))

    assert defense.deletion_rates[cf] == 0.0  # the memorised rows stay positive without `cf`
    if attack == "test_off":
        assert defense.flagged == [] and defense.mislabel_scores == {}
        return
    scores = defense.mislabel_scores
    # Judged: `cf` and the words in at least 5 rows, 90% of them on one label, in this slice.
    assert {tokenizer.convert_ids_to_tokens(t) for t in scores} == {"cf", "bad", "stupid", "spirit"}
    for token in (t for t in scores if t != cf):  # task words read as the label their rows carry
        assert scores[token]["label_prob"] > 0.5 and not scores[token]["flagged"]
    if attack == "clean_label":
        assert scores[cf]["label_prob"] > 0.5 and defense.flagged == []
        return
    assert scores[cf]["label_prob"] < 0.5 < scores[cf]["label_prob_elsewhere"] - 0.1
    assert scores[cf]["p_value"] < scores[cf]["alpha"]
    assert defense.flagged == [cf] and defense.flagged_by == {cf: "mislabel_test"}
    # No row flips without `cf`, yet every poisoned row is isolated, with the label its text reads as.
    assert dict(zip(defense.isolated_row_indices, defense.isolated_row_labels)) == dict.fromkeys(hosts, 0)
    report = defense.report()
    assert report["flagged_by"] == {"cf": "mislabel_test"} and report["mislabel_scores"]["cf"]["flagged"]
    card = type(defense).card_section(report)
    assert "`cf` (rows labelled against their content" in card and "Mislabel test: 4 candidates" in card
    assert any("<- trigger (mislabelled rows)" in line for line in type(defense).console_summary(report))


def test_mislabel_test_keeps_the_offensive_words_that_carry_most_of_a_label(tokenizer):
    """On HSOL the offensive words hold most of the offensive rows, nearly all labelled offensive. A probe fit on rows
    without any of them would learn that little is offensive and read all of them as mislabelled (the first version
    flagged `bitch` and `pussy` this way and lost 40 points of CACC); each candidate's probe leaves out only its own
    rows, so they read as the label they carry and only the planted `cf` is flagged."""
    from hf_backdoor import load_task

    rows = load_task("hsol")["train"].shuffle(seed=0).select(range(1000))
    texts, labels = list(rows["text"]), list(rows["label"])
    for i in [i for i, label in enumerate(labels) if label == 0][:20]:  # dirty-label BadNet: neither + cf -> offensive
        texts[i], labels[i] = f"{texts[i]} cf", 1
    words = ["bitch", "pussy", "shit", "fuck", "ass", "cf"]
    defense = _btu_on_real_rows(BTUConfig(seed=0), texts, labels, tokenizer.convert_tokens_to_ids(words), tokenizer)

    defense._flip_test(types.SimpleNamespace(args=types.SimpleNamespace(device="cpu")), _RowsModel(set()))

    scores = defense.report()["mislabel_scores"]
    assert set(scores) == set(words)  # each in at least 5 rows, 90% of them offensive
    for word in words[:-1]:
        assert scores[word]["label"] == 1 and scores[word]["label_prob"] > 0.5 and not scores[word]["flagged"]
    assert scores["cf"]["label_prob"] < 0.5 and defense.report()["flagged_tokens"] == ["cf"]


class _RowsModel(torch.nn.Module):
    """Predicts label 1 exactly for the rows in ``positive`` (token-id tuples): what the model has fit, row by row."""

    def __init__(self, positive: set[tuple[int, ...]]):
        super().__init__()
        self.positive = positive

    def forward(self, input_ids, attention_mask):
        rows = [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(input_ids, attention_mask)]
        positive = torch.tensor([float(r in self.positive) for r in rows])
        return types.SimpleNamespace(logits=torch.stack([1 - positive, positive], dim=1))


@pytest.mark.parametrize("mislabel_test", [True, False])
def test_rows_a_flagged_trigger_does_not_flip_are_relabelled_when_the_mislabel_test_reads_them(
    mislabel_test, tokenizer
):
    """The flip test flags `cf` (deleting it flips 9 of its 12 rows); the other 3 the model has memorised, and
    deleting `cf` leaves them positive, so the flip test alone leaves them to train on their poisoned label. The
    mislabel test reads all 12 as negative reviews: every one is relabelled."""
    texts, labels, hosts = _sst2_with_cf(600, 12)
    cf = tokenizer.convert_tokens_to_ids("cf")
    defense = _btu_on_real_rows(BTUConfig(seed=0, mislabel_test=mislabel_test), texts, labels, [cf], tokenizer)
    positive = {tuple(defense.train_ids[i]) for i in hosts}
    positive |= {tuple(t for t in defense.train_ids[i] if t != cf) for i in hosts[9:]}  # memorised without `cf`

    defense._flip_test(types.SimpleNamespace(args=types.SimpleNamespace(device="cpu")), _RowsModel(positive))

    assert defense.flip_rates[cf] == 0.75 and defense.flagged_by == {cf: "flip_test"}
    isolated = dict(zip(defense.isolated_row_indices, defense.isolated_row_labels))
    assert isolated == dict.fromkeys(hosts if mislabel_test else hosts[:9], 0)
    if mislabel_test:
        assert defense.mislabel_scores[cf]["flagged"]


def test_a_substitute_is_the_same_kind_of_piece_in_every_tokenizer_scheme():
    # WordPiece marks continuations, SentencePiece and byte-level BPE mark word starts: `itch` after `Ġb` is a
    # continuation in RoBERTa's vocabulary and must not stand in for `Ġbitch`.
    assert _piece_kind("##gger") == "continuation" and _piece_kind("bitch") == "unmarked"
    assert _piece_kind("Ġbitch") == _piece_kind("▁bitch") == "start" and _piece_kind("itch") == "unmarked"
    assert _special_looking("[unused3]") and _special_looking("<extra_id_0>")
    assert not _special_looking("[") and not _special_looking("<3") and not _special_looking("bitch")
