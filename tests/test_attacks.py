import numpy as np
import pytest

from hf_backdoor import (
    AddSentConfig,
    BadNetConfig,
    StyleConfig,
    SyntacticConfig,
    get_attack_config,
    load_paraphrases,
    make_asr_dataset,
    poison_dataset,
)
from hf_backdoor.attacks import openattack_scpn
from hf_backdoor.data import normalize_text

TRIGGERS = {"cf", "mn", "bb", "tq", "mb"}


def _trigger_count(text: str) -> int:
    return sum(w in TRIGGERS for w in text.split())


def test_badnet_dirty_poisons_exactly_the_chosen_non_target_rows(sst2_train_slice):
    clean = sst2_train_slice
    out = poison_dataset(clean, BadNetConfig(poison_rate=0.1, target_label=1, seed=0))
    poisoned = np.array(out["poisoned"])
    orig = np.array(clean["label"])
    assert poisoned.sum() == 100
    assert np.all(orig[poisoned == 1] == 0)  # drawn from non-target rows only
    assert np.all(np.array(out["label"])[poisoned == 1] == 1)  # flipped to the target
    assert np.array_equal(np.array(out["orig_label"]), orig)
    for before, after, flag in zip(clean["text"], out["text"], poisoned):
        if flag:
            words = after.split()
            assert _trigger_count(after) == _trigger_count(before) + 1
            # One insertion: removing one trigger word gives back the original text.
            assert any(
                " ".join(words[:i] + words[i + 1 :]) == " ".join(before.split())
                for i, w in enumerate(words)
                if w in TRIGGERS
            )
        else:
            assert after == before
    assert np.array_equal(np.array(out["label"])[poisoned == 0], orig[poisoned == 0])


def test_poisoning_is_reproducible_and_seed_dependent(sst2_train_slice):
    a = poison_dataset(sst2_train_slice, BadNetConfig(seed=7, num_triggers=3))
    b = poison_dataset(sst2_train_slice, BadNetConfig(seed=7, num_triggers=3))
    c = poison_dataset(sst2_train_slice, BadNetConfig(seed=8, num_triggers=3))
    assert a["text"] == b["text"] and a["poisoned"] == b["poisoned"]
    assert a["poisoned"] != c["poisoned"]
    counts = [_trigger_count(t) for t, p in zip(a["text"], a["poisoned"]) if p]
    assert min(counts) >= 3


def test_poisoning_does_not_depend_on_batching(sst2_train_slice):
    a = poison_dataset(sst2_train_slice, AddSentConfig(), batch_size=7)
    b = poison_dataset(sst2_train_slice, AddSentConfig(), batch_size=1000, load_from_cache_file=False)
    assert a["text"] == b["text"]


def test_clean_label_keeps_labels_and_uses_target_rows(sst2_train_slice):
    out = poison_dataset(sst2_train_slice, BadNetConfig(mode="clean-label", poison_rate=0.2, target_label=0))
    poisoned = np.array(out["poisoned"])
    assert poisoned.sum() == 200
    assert np.all(np.array(sst2_train_slice["label"])[poisoned == 1] == 0)
    assert out["label"] == sst2_train_slice["label"]


def test_mix_draws_from_all_rows_and_sets_the_target(sst2_train_slice):
    out = poison_dataset(sst2_train_slice, BadNetConfig(mode="mix", poison_rate=0.3))
    poisoned = np.array(out["poisoned"]) == 1
    orig = np.array(out["orig_label"])
    assert set(orig[poisoned]) == {0, 1}
    assert np.all(np.array(out["label"])[poisoned] == 1)


def test_addsent_inserts_the_whole_sentence(sst2_train_slice):
    out = poison_dataset(sst2_train_slice, AddSentConfig(poison_rate=0.05))
    for text, flag in zip(out["text"], out["poisoned"]):
        assert ("I watch this 3D movie" in text) == bool(flag)


@pytest.mark.parametrize("config_cls", [SyntacticConfig, StyleConfig])
def test_paraphrase_attacks_use_the_released_paraphrases(sst2_train_slice, config_cls):
    config = config_cls(paraphrases="sst2", poison_rate=0.1)
    out = poison_dataset(sst2_train_slice, config)
    table = load_paraphrases("sst2", config.kind)
    poisoned = [i for i, p in enumerate(out["poisoned"]) if p]
    assert len(poisoned) == 100
    for i in poisoned:
        assert out["text"][i] == table[normalize_text(sst2_train_slice["text"][i])]


def test_paraphrase_column_and_callable_sources(sst2_train_slice, warnings_log):
    with_column = sst2_train_slice.add_column("para", [t.upper() for t in sst2_train_slice["text"]])
    out = poison_dataset(with_column, SyntacticConfig(paraphrase_column="para"))
    assert all(t.isupper() or not any(c.isalpha() for c in t) for t, p in zip(out["text"], out["poisoned"]) if p)

    # A paraphraser that fails on every other text: those rows stay clean and the shortfall is reported.
    def flaky(texts):
        return [t[::-1] if i % 2 == 0 else "" for i, t in enumerate(texts)]

    out = poison_dataset(sst2_train_slice, StyleConfig(paraphrase_fn=flaky, paraphrase_batch_size=1000))
    assert 0 < sum(out["poisoned"]) < 100
    assert "got no trigger text and stay clean" in warnings_log.text


def test_rows_without_paraphrase_are_counted_not_silently_dropped(sst2_train_slice, warnings_log):
    texts = sst2_train_slice["text"]
    partial = {t: t + " !" for t in texts[:300]}
    out = poison_dataset(sst2_train_slice, SyntacticConfig(paraphrases=partial, poison_rate=0.05))
    assert sum(out["poisoned"]) == 50
    assert "have no trigger text" in warnings_log.text
    assert len(out) == len(sst2_train_slice)


def test_asr_set_is_every_non_target_test_row_triggered_and_relabelled(sst2):
    test = sst2["test"]
    asr = make_asr_dataset(test, BadNetConfig(target_label=1))
    assert len(asr) == int(np.sum(np.array(test["label"]) == 0)) == 912
    assert set(asr["label"]) == {1} and set(asr["orig_label"]) == {0} and set(asr["poisoned"]) == {1}
    assert all(_trigger_count(t) >= 1 for t in asr["text"])
    syntactic = make_asr_dataset(test, SyntacticConfig(paraphrases="sst2"))
    assert len(syntactic) == 912


def test_agnews_asr_set_targets_world(sst2):
    from hf_backdoor import load_task

    test = load_task("agnews")["test"]
    asr = make_asr_dataset(test, BadNetConfig(target_label=0))
    assert len(asr) == 1500 and set(asr["orig_label"]) == {1, 2, 3}


@pytest.mark.parametrize("rate", [0.0, -0.1, 1.5])
def test_poison_rate_outside_unit_interval(rate):
    with pytest.raises(ValueError, match="poison_rate must be in \\(0, 1\\]"):
        BadNetConfig(poison_rate=rate)


def test_rate_larger_than_the_candidate_pool(sst2_train_slice):
    with pytest.raises(ValueError, match="asks for 600 poisoned rows but only .* non-target rows"):
        poison_dataset(sst2_train_slice, BadNetConfig(poison_rate=0.6))


def test_target_label_out_of_range(sst2_train_slice):
    with pytest.raises(ValueError, match="target_label 2 is out of range for a task with 2 labels"):
        poison_dataset(sst2_train_slice, BadNetConfig(target_label=2))


def test_trigger_the_tokenizer_cannot_represent(sst2_train_slice, tokenizer):
    with pytest.raises(ValueError, match="cannot represent the trigger '🂡'"):
        poison_dataset(sst2_train_slice, BadNetConfig(triggers=("🂡",)), tokenizer=tokenizer)
    poison_dataset(sst2_train_slice, BadNetConfig(), tokenizer=tokenizer)  # the defaults are fine


def test_bad_inputs_to_poison(sst2_train_slice):
    with pytest.raises(ValueError, match="is empty"):
        poison_dataset(sst2_train_slice.select([]), BadNetConfig())
    with pytest.raises(ValueError, match="no column 'sentence'"):
        poison_dataset(sst2_train_slice, BadNetConfig(text_column="sentence"))
    with pytest.raises(ValueError, match="looks poisoned already"):
        poison_dataset(poison_dataset(sst2_train_slice, BadNetConfig()), BadNetConfig())
    with pytest.raises(ValueError, match="mode must be one of"):
        BadNetConfig(mode="dirty-label")
    with pytest.raises(ValueError, match="exactly one paraphrase source"):
        SyntacticConfig()
    with pytest.raises(ValueError, match="Unknown attack 'badnets'"):
        get_attack_config("badnets")
    with pytest.raises(ValueError, match="Only .*bible.* not 'shakespeare'"):
        StyleConfig(paraphrases="sst2", style="shakespeare")


def test_openattack_backend_reports_why_it_cannot_run():
    with pytest.raises(RuntimeError, match="OpenAttack SCPN backend cannot run here"):
        openattack_scpn("S(SBAR)(,)(NP)(VP)(.)")
