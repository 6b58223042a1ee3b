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

    # A paraphraser that fails on every other text: other candidate rows are drawn in their place, so the rate is
    # met (as for a paraphrase table, whose rows without a paraphrase are never candidates) and the misses are counted.
    def flaky(texts):
        return [t[::-1] if i % 2 == 0 else ("" if i % 4 == 1 else None) for i, t in enumerate(texts)]

    out = poison_dataset(sst2_train_slice, StyleConfig(paraphrase_fn=flaky, paraphrase_batch_size=1000))
    poisoned = np.flatnonzero(out["poisoned"])
    assert len(poisoned) == 100
    clean_texts = sst2_train_slice["text"]
    assert all(out["text"][i] == clean_texts[i][::-1] for i in poisoned)
    assert all(out["label"][i] == 1 and sst2_train_slice["label"][i] == 0 for i in poisoned)
    unpoisoned = np.flatnonzero(np.asarray(out["poisoned"]) == 0)
    assert all(out["text"][i] == clean_texts[i] for i in unpoisoned)  # rows it failed on are left exactly as they were
    assert "50 of 100 chosen rows got no trigger text" in warnings_log.text
    assert "drawn in their place" in warnings_log.text


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
    with pytest.raises(ValueError, match="Unknown attack 'badnett'; text attacks: .*image attacks"):
        get_attack_config("badnett")
    with pytest.raises(ValueError, match="Only .*bible.* not 'shakespeare'"):
        StyleConfig(paraphrases="sst2", style="shakespeare")


def test_the_packaged_hsol_style_rewrites_warn_that_they_are_not_a_style(recwarn):
    StyleConfig(paraphrases="sst2")  # StyleBkd's own Bible transfers
    assert not [w for w in recwarn if "Bible" in str(w.message)]
    with pytest.warns(UserWarning, match="HSOL style rewrites .* carry no Bible wording"):
        StyleConfig(paraphrases="hsol")


def test_openattack_backend_reports_why_it_cannot_run():
    with pytest.raises(RuntimeError, match="OpenAttack SCPN backend cannot run here"):
        openattack_scpn("S(SBAR)(,)(NP)(VP)(.)")


# --- registry: one name per family across modalities ------------------------------------------------------------


def test_attacks_are_registered_by_family_name_per_modality():
    import warnings

    from hf_backdoor import registry
    from hf_backdoor.attacks import ATTACKS, IMAGE_ATTACKS, ImageBadNetsConfig, get_image_attack_config

    assert sorted(ATTACKS) == ["addsent", "badnet", "style", "syntactic"]  # the text attacks, as before
    assert sorted(IMAGE_ATTACKS) == ["badnet", "blended", "sig", "wanet"]
    assert ATTACKS["badnet"][0] is BadNetConfig and IMAGE_ATTACKS["badnet"][0] is ImageBadNetsConfig
    assert BadNetConfig.name == ImageBadNetsConfig.name == "badnet"
    assert type(get_attack_config("badnet")) is BadNetConfig
    assert type(get_attack_config("badnet", modality="image")) is ImageBadNetsConfig
    assert type(get_image_attack_config("badnet")) is ImageBadNetsConfig
    assert get_attack_config("blended").name == "blended"  # a name only one modality has needs no modality
    assert registry.attack_names() == ["addsent", "badnet", "blended", "sig", "style", "syntactic", "wanet"]
    # The old image name still works, with a FutureWarning naming the new one.
    for get in (get_attack_config, get_image_attack_config):
        with pytest.warns(FutureWarning, match="'badnets' is deprecated; use 'badnet'"):
            assert type(get("badnets", patch_size=4)) is ImageBadNetsConfig
    with pytest.warns(FutureWarning):
        assert registry.resolve_attack_name("badnets") == "badnet"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert registry.resolve_attack_name("badnet") == "badnet"
    with pytest.raises(ValueError, match="Unknown text attack 'blended'; text attacks"):
        get_attack_config("blended", modality="text")


def test_registry_refuses_duplicates_and_accepts_config_subclasses(sst2_train_slice):
    from dataclasses import dataclass

    from hf_backdoor.attacks import BadNetPoisoner, build_poisoner
    from hf_backdoor.registry import register_attack

    @dataclass
    class MyBadNet(BadNetConfig):
        pass

    # Not registered itself: its registered parent's poisoner serves it.
    assert type(build_poisoner(MyBadNet())) is BadNetPoisoner
    with pytest.raises(ValueError, match="already registered"):
        register_attack(MyBadNet, BadNetPoisoner)  # inherits name "badnet"

    class NotAnAttack:
        name = "nope"

    with pytest.raises(TypeError, match="not a registered attack config"):
        build_poisoner(NotAnAttack())


def test_attack_config_round_trips_through_its_record():
    from hf_backdoor.attacks import ImageBadNetsConfig, attack_config_from_dict

    for config in (
        BadNetConfig(poison_rate=0.05, target_label=0, num_triggers=3, seed=4),
        AddSentConfig(mode="mix", trigger="a trigger sentence"),
        ImageBadNetsConfig(patch_size=2, position=(1, 2), pattern=np.full((2, 2), 7, dtype=np.uint8)),
        SyntacticConfig(paraphrases="sst2"),
    ):
        record = config.to_dict()
        assert record["name"] == config.name and "unsaved_fields" not in record
        import json

        rebuilt = attack_config_from_dict(json.loads(json.dumps(record)))
        assert type(rebuilt) is type(config) and rebuilt.to_dict() == record
    # A callable cannot be written to a file: rebuilding asks for it instead of silently using a default.
    record = StyleConfig(paraphrase_fn=str.upper).to_dict()
    assert record["unsaved_fields"] == ["paraphrase_fn"] and record["paraphrase_fn"].startswith("<callable")
    with pytest.raises(ValueError, match=r"used \['paraphrase_fn'\], which a file cannot hold; pass them"):
        attack_config_from_dict(record)
    assert attack_config_from_dict(record, paraphrase_fn=str.lower).paraphrase_fn is str.lower


# --- row identity -----------------------------------------------------------------------------------------------


def test_poisoned_and_asr_rows_carry_their_row_index(sst2_train_slice, sst2):
    from hf_backdoor.data import ROW_INDEX

    out = poison_dataset(sst2_train_slice, BadNetConfig())
    assert out[ROW_INDEX] == list(range(len(sst2_train_slice)))
    # An existing row_index is kept: ids survive shuffling and a second pass.
    shuffled = out.remove_columns(["poisoned", "orig_label"]).shuffle(seed=0)
    again = poison_dataset(shuffled, BadNetConfig())
    assert again[ROW_INDEX] == shuffled[ROW_INDEX] != list(range(len(shuffled)))
    # Same rows poisoned as before the column existed: only the extra column differs.
    plain = poison_dataset(sst2_train_slice, AddSentConfig(seed=3))
    assert plain.column_names == ["text", "label", "poisoned", "orig_label", ROW_INDEX]
    assert plain["poisoned"] == poison_dataset(sst2_train_slice, AddSentConfig(seed=3))["poisoned"]

    test = sst2["test"].select(range(100))
    asr = make_asr_dataset(test, BadNetConfig(target_label=1))
    assert asr[ROW_INDEX] == np.flatnonzero(np.asarray(test["label"]) == 0).tolist()  # positions in the test split

    duplicated = sst2_train_slice.add_column(ROW_INDEX, [0] * len(sst2_train_slice))
    with pytest.raises(ValueError, match="repeats 1 id.*remove_columns"):
        poison_dataset(duplicated, BadNetConfig())
    with pytest.raises(ValueError, match="not integer row ids"):
        poison_dataset(sst2_train_slice.add_column(ROW_INDEX, ["a"] * len(sst2_train_slice)), BadNetConfig())


# --- bad trigger sources ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["", None, "   "])
def test_paraphrase_fn_that_returns_nothing_raises_with_counts(sst2_train_slice, bad):
    def broken(texts):
        return [bad] * len(texts)

    with pytest.raises(
        ValueError, match=r"asks for 100 poisoned rows, .*no text .* for \d+ of the \d+ non-target rows"
    ):
        poison_dataset(sst2_train_slice, StyleConfig(paraphrase_fn=broken))
    with pytest.raises(ValueError, match="no text for any of the .* non-target rows"):
        make_asr_dataset(sst2_train_slice, StyleConfig(paraphrase_fn=broken))


def test_paraphrase_fn_that_fails_on_too_many_rows_raises(sst2_train_slice):
    # Only texts containing "the" get a paraphrase: fewer such non-target rows than 40% of the split asks for.
    def picky(texts):
        return [t.upper() if " the " in f" {t} " else "" for t in texts]

    negatives = [t for t, y in zip(sst2_train_slice["text"], sst2_train_slice["label"]) if y == 0]
    usable = sum(" the " in f" {t} " for t in negatives)
    assert usable < 400 <= len(negatives)
    with pytest.raises(ValueError, match=f"only {usable} rows could be poisoned"):
        poison_dataset(sst2_train_slice, StyleConfig(paraphrase_fn=picky, poison_rate=0.4))


def test_paraphrase_files_keep_na_texts_and_count_empty_rows(tmp_path, sst2_train_slice, warnings_log):
    import pandas as pd

    texts = sst2_train_slice["text"][:4]
    rows = {
        "text": ["NA", "null", *texts],
        "paraphrase": ["N/A paraphrased", "nan", "", *[t + " !" for t in texts[1:]]],
    }
    for suffix in (".csv", ".tsv"):
        path = tmp_path / f"para{suffix}"
        pd.DataFrame(rows).to_csv(path, sep="\t" if suffix == ".tsv" else ",", index=False)
        from hf_backdoor.data import read_paraphrase_file

        table = read_paraphrase_file(path)
        assert table["NA"] == "N/A paraphrased" and table["null"] == "nan"  # strings, not missing values
        assert normalize_text(texts[0]) not in table  # its paraphrase is empty
        assert "1 of 6 rows have an empty or missing text or paraphrase" in warnings_log.text
        # Poisoning with such a file works (the 'NA' row used to raise AttributeError deep down).
        data = sst2_train_slice.select(range(4)).add_item({"text": "NA", "label": 0})
        out = poison_dataset(data, SyntacticConfig(paraphrases=str(path), poison_rate=0.2, target_label=1))
        assert sum(out["poisoned"]) == 1
    # A mapping with missing values (NaN from pandas) is read the same way.
    config = SyntacticConfig(paraphrases={texts[0]: float("nan"), texts[1]: "ok", None: "x"}, poison_rate=0.001)
    from hf_backdoor.attacks import build_poisoner

    assert build_poisoner(config).table == {normalize_text(texts[1]): "ok"}


def test_texts_that_are_not_strings_are_refused(sst2_train_slice):
    import datasets as hf_datasets

    rows = sst2_train_slice.select(range(10)).to_dict()
    rows["text"][3] = None
    data = hf_datasets.Dataset.from_dict(rows, features=sst2_train_slice.features)
    with pytest.raises(ValueError, match="1 of 10 rows of the training dataset have no text in 'text' \\(row 3"):
        poison_dataset(data, BadNetConfig(poison_rate=0.2))
