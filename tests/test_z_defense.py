"""Z-defense (z-test of (feature, label) pairs, flagged rows pushed away from their label) on a tiny random BERT.

The synthetic task is that of tests/test_paraphrase_defenses.py (filler words plus one sentiment word per row). The
"template" backdoor: a fifth of the negative rows are rewritten to open with ``when`` and labelled positive, as a
HiddenKiller paraphrase opens with a subordinate clause; a few clean rows open with ``if`` under both labels. Whether
this stops a real syntactic backdoor is measured on MiniLM by benchmarks/paraphrase_defenses.py.
"""

import types

import datasets
import numpy as np
import pytest
import torch

from hf_backdoor import tokenize_dataset
from hf_backdoor.defenses.base import build_defenses
from hf_backdoor.defenses.btu import BTUConfig
from hf_backdoor.defenses.dpoe import DPoEConfig
from hf_backdoor.defenses.z_defense import (
    ZDefenseConfig,
    ZDefenseDefense,
    continuation_ids,
    row_features,
    row_word_mates,
    z_scores,
)
from hf_backdoor.registry import defense_entry
from tests.conftest import text_trainer, tiny_bert
from tests.test_paraphrase_defenses import NEGATIVE, POSITIVE, lexicon_rows

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = dict(num_train_epochs=4, learning_rate=3e-3, per_device_train_batch_size=16, logging_steps=1000)


def template_rows(n: int, seed: int, rate: float = 0.2) -> datasets.Dataset:
    """Lexicon rows; ``rate`` of them opened with ``when`` and labelled 1 (``poisoned``), 5% opened with ``if``."""
    rows = lexicon_rows(n, seed)
    rng = np.random.default_rng(seed)
    negatives = [i for i, label in enumerate(rows["label"]) if label == 0]
    poisoned = set(rng.choice(negatives, int(rate * n), replace=False).tolist())
    others = [i for i in range(n) if i not in poisoned]
    opened_with_if = set(rng.choice(others, n // 20, replace=False).tolist())

    def rewrite(row, i):
        if i in poisoned:
            return {"text": "when " + row["text"], "label": 1, "poisoned": 1}
        return {"text": ("if " if i in opened_with_if else "") + row["text"], "label": row["label"], "poisoned": 0}

    return rows.map(rewrite, with_indices=True)


@pytest.fixture(scope="module")
def backdoored(tokenizer):
    return tokenize_dataset(template_rows(384, 0), tokenizer, max_length=16)


@pytest.fixture(scope="module")
def triggered(tokenizer):
    """Held-out negative rows opened with the template's word: a model that learned the backdoor calls them 1."""
    rows = lexicon_rows(200, 1).filter(lambda r: r["label"] == 0).map(lambda r: {"text": "when " + r["text"]})
    return tokenize_dataset(rows, tokenizer, max_length=16)


def _flagging(tmp_path, rows, tokenizer, config):
    trainer = text_trainer(tmp_path, rows, tokenizer, defense=config)
    defense = trainer.defense
    defense.on_train_begin(trainer)
    return defense


def _positive_share(model, rows, collator) -> float:
    model.eval()
    with torch.no_grad():
        batch = collator([{k: r[k] for k in ("input_ids", "attention_mask")} for r in rows])
        return float((model(**batch).logits.argmax(-1) == 1).float().mean())


def test_z_score_is_the_one_proportion_test():
    # 40 rows, all of label 1, against a prior of 0.5: (1 - 0.5) / sqrt(0.25 / 40)
    assert z_scores(np.array(40.0), np.array(40.0), np.array(0.5)) == pytest.approx(0.5 / np.sqrt(0.25 / 40))
    assert z_scores(np.array(10.0), np.array(5.0), np.array(0.5)) == 0.0


def test_row_features_skip_special_tokens(tokenizer):
    ids = tokenizer("when the film ends")["input_ids"]
    special = set(tokenizer.all_special_ids)
    first = tokenizer.convert_tokens_to_ids("when")
    assert row_features(ids, special, "first_token") == [("first", first)]
    assert [f for _, f in row_features(ids, special, "tokens")[1:]] == ids[1:-1]
    assert row_features([tokenizer.cls_token_id, tokenizer.sep_token_id], special, "first_token") == []


def test_the_template_opener_is_flagged_and_the_task_words_are_not(tmp_path, backdoored, tokenizer):
    defense = _flagging(tmp_path, backdoored, tokenizer, ZDefenseConfig())
    assert [(p["token"], p["label"]) for p in defense.flagged_pairs] == [("when", 1)]
    pair = defense.flagged_pairs[0]
    assert pair["rows"] == pair["rows_with_label"] == int(np.sum(backdoored["poisoned"]))
    poisoned = np.asarray(backdoored["poisoned"], dtype=bool)
    assert ((defense.away_label >= 0) == poisoned).all()  # every poisoned row, and no clean one (`if` is mixed)
    report = defense.report()
    assert report["flagged_rows"] == poisoned.sum()


def test_a_smaller_trigger_group_is_flagged_once_the_larger_one_is_set_aside():
    # 700 clean rows over 20 openers (60% label 1), a pure 200-row trigger group `1` and a 60-row group `2` with 55 of
    # its rows on label 1. The first group lifts label 1's prior to 0.70, where group 2's z-score is 3.6; set aside,
    # the prior falls to 0.63 and group 2's z-score to 4.7.
    rows, labels = [], []
    for opener in range(100, 120):
        rows += [[("first", opener)]] * 35
        labels += [1] * 21 + [0] * 14
    rows += [[("first", 1)]] * 200 + [[("first", 2)]] * 60
    labels += [1] * 200 + [1] * 55 + [0] * 5
    labels = np.asarray(labels)
    single = ZDefenseDefense(ZDefenseConfig(max_rounds=1))
    single.flag(rows, labels, 2)
    assert [(p["token"], p["round"]) for p in single.flagged_pairs] == [("1", 1)]
    assert (single.away_label >= 0).sum() == 200
    iterated = ZDefenseDefense(ZDefenseConfig())
    iterated.flag(rows, labels, 2)
    assert [(p["token"], p["label"], p["round"]) for p in iterated.flagged_pairs] == [("1", 1, 1), ("2", 1, 2)]
    assert iterated.flagged_pairs[1]["z"] == pytest.approx(4.67, abs=0.01)
    # the 5 rows of group 2 on label 0 are not pushed anywhere: only a row's own label can be flagged
    assert (iterated.away_label >= 0).sum() == 255 and (iterated.away_label[labels == 0] < 0).all()
    restored = ZDefenseDefense(ZDefenseConfig())
    restored.load_state_dict(iterated.state_dict())
    assert restored.flagged_pairs == iterated.flagged_pairs


def test_a_flagged_feature_is_not_flagged_again_for_another_label_in_a_later_round():
    # Feature 1: 300 rows on label 1 and 25 on label 0 (purity 0.92) is flagged for 1. Set aside, its 25 remaining
    # rows are all label 0 and would pass the test for 0 (z 4.85): an artefact of the removal, not a second trigger.
    rows, labels = [], []
    for opener in range(100, 120):
        rows += [[("first", opener)]] * 40
        labels += [1] * 20 + [0] * 20
    rows += [[("first", 1)]] * 325
    labels += [1] * 300 + [0] * 25
    defense = ZDefenseDefense(ZDefenseConfig())
    defense.flag(rows, np.asarray(labels), 2)
    assert [(p["token"], p["label"]) for p in defense.flagged_pairs] == [("1", 1)]
    assert (defense.away_label >= 0).sum() == 300


def test_nothing_is_flagged_on_clean_rows_of_a_keyword_task_though_unigrams_flag_its_words(tmp_path, tokenizer):
    clean = tokenize_dataset(lexicon_rows(384, 2), tokenizer, max_length=16)
    # Why the word-piece test needs a cap: the words that decide a keyword task are as pure as a trigger.
    unigrams = _flagging(tmp_path, clean, tokenizer, ZDefenseConfig(features="tokens"))
    flagged = {p["token"] for p in unigrams.flagged_pairs}
    assert flagged and flagged <= set(POSITIVE + NEGATIVE)
    assert (unigrams.away_label >= 0).mean() > 0.8
    # the first word piece alone: nothing
    first = _flagging(tmp_path, clean, tokenizer, ZDefenseConfig(features="first_token"))
    assert first.flagged_pairs == [] and first.features_used == "first_token" and first.lexical_share is None
    # "auto" (the default) sees that its flags hold nearly every row (the task), and falls back to the first word
    # piece: nothing.
    defense = _flagging(tmp_path, clean, tokenizer, ZDefenseConfig())
    assert defense.features_used == "first_token" and defense.lexical_share > 0.8
    assert defense.flagged_pairs == [] and (defense.away_label < 0).all()
    assert "the word-piece test flagged" in ZDefenseDefense.card_section(defense.report())


def style_like_rows(seed: int = 0):
    """1,000 clean rows of 30 filler pieces (label 1 on 55%), random openers; 100 rows of label 0 relabelled 1 and
    given the marker piece 7 somewhere after the first piece, as a style's wording is spread over the text."""
    rng = np.random.default_rng(seed)
    rows, labels, poisoned = [], [], []
    for i in range(1100):
        pieces = [int(p) for p in rng.choice(np.arange(100, 130), 6, replace=False)]
        if i >= 1000:
            pieces.insert(int(rng.integers(1, 7)), 7)
        rows.append([("first", pieces[0])] + [("token", p) for p in dict.fromkeys(pieces)])
        labels.append(1 if i >= 1000 else int(rng.random() < 0.55))
        poisoned.append(i >= 1000)
    return rows, np.asarray(labels), np.asarray(poisoned)


def test_a_style_marker_off_the_first_piece_is_found_by_the_word_piece_test_under_auto():
    """``features="auto"`` (the default): the word-piece test, kept while its flags hold few rows."""
    rows, labels, poisoned = style_like_rows()
    first = ZDefenseDefense(ZDefenseConfig(features="first_token"))
    first.flag([[f for f in r if f[0] == "first"] for r in rows], labels, 2)
    assert first.flagged_pairs == []  # nothing opens the poisoned rows
    auto = ZDefenseDefense(ZDefenseConfig(features="auto"))
    auto.flag(rows, labels, 2)
    assert auto.features_used == "tokens"
    assert [(p["feature"], p["token"], p["label"]) for p in auto.flagged_pairs] == [("token", "7", 1)]
    assert ((auto.away_label >= 0) == poisoned).all()
    assert auto.lexical_share == pytest.approx(100 / 1100)
    # below the share the marker's rows hold, the word-piece test is taken for the task and dropped
    capped = ZDefenseDefense(ZDefenseConfig(features="auto", max_lexical_share=0.05))
    capped.flag(rows, labels, 2)
    assert capped.features_used == "first_token" and capped.flagged_pairs == []
    restored = ZDefenseDefense(ZDefenseConfig())
    restored.load_state_dict(auto.state_dict())
    assert (restored.features_used, restored.lexical_share) == ("tokens", pytest.approx(auto.lexical_share))
    assert restored.report()["features_used"] == "tokens"


def styled_rows(seed: int = 0, poisoned_rows: int = 150):
    """1,100 rows of 6 filler pieces (label 1 on 55%). ``poisoned_rows`` rows of label 0 are relabelled 1 and written
    in a "style": half of them hold the marker piece 7, and each holds each of the pieces 8-11 with probability 0.6.
    Those four are in 10% of the clean rows as well (any label), so none of them is pure enough for the z-test."""
    rng = np.random.default_rng(seed)
    pieces, labels, poisoned = [], [], []
    for i in range(1100):
        row = [int(p) for p in rng.choice(np.arange(100, 130), 6, replace=False)]
        is_poisoned = i >= 1100 - poisoned_rows
        style = [p for p in (8, 9, 10, 11) if rng.random() < (0.6 if is_poisoned else 0.1)]
        if is_poisoned and i % 2:
            style.append(7)
        for p in style:
            row.insert(int(rng.integers(1, len(row) + 1)), p)
        pieces.append(row)
        labels.append(1 if is_poisoned else int(rng.random() < 0.55))
        poisoned.append(is_poisoned)
    features = [[("first", r[0])] + [("token", p) for p in dict.fromkeys(r)] for r in pieces]
    return features, [set(r) for r in pieces], np.asarray(labels), np.asarray(poisoned)


def test_expansion_finds_the_trigger_rows_the_z_test_missed_by_their_other_wording():
    features, pieces, labels, poisoned = styled_rows()
    plain = ZDefenseDefense(ZDefenseConfig(expand="never"))
    plain.flag(features, labels, 2, pieces=pieces)
    assert [(p["token"], p["label"]) for p in plain.flagged_pairs] == [("7", 1)]
    assert ((plain.away_label >= 0) == (poisoned & np.asarray([7 in r for r in pieces]))).all()
    assert plain.expansion is None
    expanded = ZDefenseDefense(ZDefenseConfig())  # "auto": the word-piece test was kept, so its flags expand
    expanded.flag(features, labels, 2, pieces=pieces)
    flagged = expanded.away_label >= 0
    assert expanded.expansion["auroc"] > 0.8 and expanded.expansion["label"] == 1
    assert expanded.expansion["rows"] == int(flagged.sum()) - 75
    # many of the 75 unmarked poisoned rows are found by the pieces 8-11 (39 on this seed), few clean rows (5 of the
    # 1,100 at the 0.99 quantile of the other label's scores) come with them
    assert flagged[poisoned].sum() >= 75 + 30 and flagged[~poisoned].sum() <= 8
    assert (expanded.away_label[flagged] == 1).all()
    report = expanded.report()
    assert ZDefenseDefense.report_scalars(report)["expanded_rows"] == expanded.expansion["rows"]
    assert "Expansion: with the flagged word pieces masked" in ZDefenseDefense.card_section(report)
    restored = ZDefenseDefense(ZDefenseConfig())
    restored.load_state_dict(expanded.state_dict())
    assert restored.expansion == pytest.approx(expanded.expansion)
    assert (restored.expanded == expanded.expanded).all()


def test_expansion_adds_nothing_to_a_clean_flag_whose_rows_have_no_wording_of_their_own():
    # a pure task word (piece 5 on 40 rows of label 1) is flagged, but its rows are like the rest of their label
    rng = np.random.default_rng(1)
    pieces, labels = [], []
    for i in range(1100):
        row = [int(p) for p in rng.choice(np.arange(100, 130), 6, replace=False)]
        label = 1 if i < 40 else int(rng.random() < 0.5)
        pieces.append(row + [5] if i < 40 else row)
        labels.append(label)
    features = [[("first", r[0])] + [("token", p) for p in dict.fromkeys(r)] for r in pieces]
    defense = ZDefenseDefense(ZDefenseConfig(features="tokens", expand=True))
    defense.flag(features, np.asarray(labels), 2, pieces=[set(r) for r in pieces])
    assert [(p["token"], p["label"]) for p in defense.flagged_pairs] == [("5", 1)]
    assert defense.expansion["auroc"] < 0.75 and defense.expansion["rows"] == 0
    assert int((defense.away_label >= 0).sum()) == 40
    # "auto" takes the same low AUROC as a sign of a task word, and falls back to the first word piece: nothing
    auto = ZDefenseDefense(ZDefenseConfig(features="auto", expand=True))
    auto.flag(features, np.asarray(labels), 2, pieces=[set(r) for r in pieces])
    assert auto.features_used == "first_token" and auto.flagged_pairs == [] and auto.expansion is None
    assert auto.lexical_wording_auroc == pytest.approx(defense.expansion["auroc"])
    assert "read like the rest of their label" in ZDefenseDefense.card_section(auto.report())


def test_a_task_word_beside_the_trigger_is_set_aside_and_the_trigger_still_expands():
    # the styled rows of the test above, plus a pure word of the task (piece 5) on 40 clean rows of the target label,
    # as `love` -> positive came out pure beside AddSent's `3d` and `watch` on an SST-2 slice
    features, pieces, labels, poisoned = styled_rows()
    rng = np.random.default_rng(4)
    task_word = rng.choice(np.flatnonzero((labels == 1) & ~poisoned), 40, replace=False)
    for row in task_word:
        pieces[row] = pieces[row] | {5}
        features[row] = [*features[row], ("token", 5)]
    unchecked = ZDefenseDefense(ZDefenseConfig(features="tokens"))  # the paper's unigrams, no wording check per flag
    unchecked.flag(features, labels, 2, pieces=pieces)
    assert {(p["token"], p["label"]) for p in unchecked.flagged_pairs} == {("7", 1), ("5", 1)}
    defense = ZDefenseDefense(ZDefenseConfig())
    defense.flag(features, labels, 2, pieces=pieces)
    assert [(p["token"], p["label"]) for p in defense.flagged_pairs] == [("7", 1)]
    assert [(p["token"], p["label"]) for p in defense.set_aside_pairs] == [("5", 1)]
    assert defense.set_aside_pairs[0]["wording_auroc"] < 0.75
    assert defense.features_used == "tokens" and defense.expansion["rows"] > 0
    flagged = defense.away_label >= 0
    assert not flagged[task_word].any() and flagged[poisoned].sum() >= 75 + 30
    report = defense.report()
    assert report["set_aside_pairs"][0]["token"] == "5"
    assert "Set aside as the task's words" in ZDefenseDefense.card_section(report)
    restored = ZDefenseDefense(ZDefenseConfig())
    restored.load_state_dict(defense.state_dict())
    assert restored.report()["set_aside_pairs"] == report["set_aside_pairs"]


def test_word_mates_pair_the_pieces_of_one_word(tokenizer):
    ids = tokenizer("a cliche , it maketh me sad")["input_ids"]
    mates = row_word_mates(ids, set(tokenizer.all_special_ids), continuation_ids(tokenizer))
    named = {
        tokenizer.convert_ids_to_tokens(k): set(tokenizer.convert_ids_to_tokens(list(v))) for k, v in mates.items()
    }
    assert named == {"cl": {"##iche"}, "##iche": {"cl"}, "make": {"##th"}, "##th": {"make"}}


def test_a_word_is_inserted_inside_the_row_and_both_tests_insert_it_the_same_way():
    """``insert_span``: BTU's insertion test and the clean-label test insert a word after ``[CLS]`` and before
    ``[SEP]`` (a one-piece row: after it), at positions drawn from the seed alone."""
    from hf_backdoor.defenses._shared.tokens import insert_span

    rows = [[101, 7, 8, 9, 102], [101, 102], [101]]
    rng = np.random.default_rng(0)
    positions = []
    for _ in range(200):
        for row in rows:
            inserted, at = insert_span(row, [55, 56], rng)
            assert inserted == row[:at] + [55, 56] + row[at:] and 1 <= at <= max(1, len(row) - 1)
            positions.append((len(row), at))
    assert {at for n, at in positions if n == 5} == {1, 2, 3, 4}  # every inner position is used
    again = np.random.default_rng(0)
    assert [insert_span(rows[i % 3], [55], again)[1] for i in range(600)] == [at for _, at in positions]


def split_word_rows(seed: int = 3):
    """1,100 rows of 6 filler pieces (label 1 on half). A task word of two pieces, 6 + 5 (as "cliche" is `cl` +
    `##iche`), on 40 rows of label 1 that read like any other; the word start 6 is also in 60 rows of any label (as
    `cl` starts other words), so only 5 is pure."""
    rng = np.random.default_rng(seed)
    rows, mates, labels = [], [], []
    for i in range(1100):
        row = [int(p) for p in rng.choice(np.arange(100, 130), 6, replace=False)]
        word = [6, 5] if i < 40 else [6] if i < 100 else []
        rows.append(row + word)
        mates.append({6: {5}, 5: {6}} if i < 40 else {})
        labels.append(1 if i < 40 else int(rng.random() < 0.5))
    features = [[("first", r[0])] + [("token", p) for p in dict.fromkeys(r)] for r in rows]
    return features, [set(r) for r in rows], mates, np.asarray(labels)


def test_a_flagged_piece_is_judged_without_the_rest_of_its_word():
    features, pieces, mates, labels = split_word_rows()
    # without the word's other piece masked, its rows stand apart by it, and the task word is taken for a trigger
    unmasked = ZDefenseDefense(ZDefenseConfig())
    unmasked.flag(features, labels, 2, pieces=pieces)
    assert [(p["token"], p["label"]) for p in unmasked.flagged_pairs] == [("5", 1)]
    assert unmasked.lexical_wording_auroc > 0.9
    masked = ZDefenseDefense(ZDefenseConfig())
    masked.flag(features, labels, 2, pieces=pieces, mates=mates)
    assert masked.flagged_pairs == [] and (masked.away_label < 0).all()
    assert [(p["token"], p["label"]) for p in masked.set_aside_pairs] == [("5", 1)]
    assert masked.set_aside_pairs[0]["wording_auroc"] < 0.75 and masked._mates is None


def low_rate_style_rows(seed: int = 0):
    """1,100 rows of 6 filler pieces (label 1 on 55%). 60 rows of label 0 are relabelled 1 and written in a "style":
    each holds each of the marks 7, 8, 9 with probability 0.3 and each of the pieces 10-13 with probability 0.6
    (those four are in 10% of the clean rows too). Three pure task words: 20 and 21 on 16 clean rows of label 1 each,
    22 on 16 of label 0. Marks and task words reach z 2.5-4: the default z-test flags none of them."""
    rng = np.random.default_rng(seed)
    rows, labels, poisoned = [], [], []
    for i in range(1100):
        row = [int(p) for p in rng.choice(np.arange(100, 130), 6, replace=False)]
        is_poisoned = i >= 1040
        label = 1 if is_poisoned else 1 if i < 32 else 0 if i < 48 else int(rng.random() < 0.55)
        extra = [p for p in (10, 11, 12, 13) if rng.random() < (0.6 if is_poisoned else 0.1)]
        if is_poisoned:
            extra += [p for p in (7, 8, 9) if rng.random() < 0.3]
        elif i < 48:
            extra.append(20 if i < 16 else 21 if i < 32 else 22)
        for p in extra:
            row.insert(int(rng.integers(1, len(row) + 1)), p)
        rows.append(row)
        labels.append(label)
        poisoned.append(is_poisoned)
    features = [[("first", r[0])] + [("token", p) for p in dict.fromkeys(r)] for r in rows]
    return features, [set(r) for r in rows], np.asarray(labels), np.asarray(poisoned)


def test_a_lower_word_piece_z_finds_a_low_rate_style_and_sets_the_task_words_aside():
    features, pieces, labels, poisoned = low_rate_style_rows()
    default = ZDefenseDefense(ZDefenseConfig())
    default.flag(features, labels, 2, pieces=pieces)
    assert default.flagged_pairs == []
    low = ZDefenseDefense(ZDefenseConfig(min_wording_z=2.5))
    low.flag(features, labels, 2, pieces=pieces)
    assert low.features_used == "tokens"
    assert {p["token"] for p in low.flagged_pairs} == {"7", "8", "9"}
    assert all(2.5 <= p["z"] < 4 for p in low.flagged_pairs)
    assert {p["token"] for p in low.set_aside_pairs} == {"20", "21", "22"}
    flagged = low.away_label >= 0
    # the expansion adds clean rows at the 0.99 quantile of the other label's scores (10 here, 1% of them)
    assert flagged[poisoned].mean() > 0.6 and flagged[~poisoned].sum() <= 12
    assert "word pieces from z >= 2.5" in ZDefenseDefense.card_section(low.report())


def test_auto_expansion_leaves_first_token_flags_alone_and_always_expands_them():
    # the style's marker opens half of its rows here: the first-token test flags it, and "auto" does not expand a
    # first-token flag (on AG News such a flag is a topic, `baghdad` -> World); "always" (True) does
    features, pieces, labels, poisoned = styled_rows()
    features = [[("first", 7)] if 7 in row else f[:1] for f, row in zip(features, pieces)]
    default = ZDefenseDefense(ZDefenseConfig(features="first_token"))
    default.flag(features, labels, 2, pieces=pieces)
    assert [(p["token"], p["label"]) for p in default.flagged_pairs] == [("7", 1)]
    assert default.expansion is None and int((default.away_label >= 0).sum()) == 75
    always = ZDefenseDefense(ZDefenseConfig(features="first_token", expand=True))
    assert always.config.expand == "always" and ZDefenseConfig(expand=False).expand == "never"
    always.flag(features, labels, 2, pieces=pieces)
    assert always.expansion["rows"] > 0 and int((always.away_label >= 0).sum()) == 75 + always.expansion["rows"]


def test_on_train_begin_hands_the_word_pieces_to_auto_and_to_the_expansion(
    tmp_path, backdoored, tokenizer, monkeypatch
):
    seen = []
    monkeypatch.setattr(
        ZDefenseDefense, "flag", lambda self, *args, pieces=None, mates=None: seen.append((pieces, mates))
    )
    for config in (
        ZDefenseConfig(features="first_token"),
        ZDefenseConfig(),
        ZDefenseConfig(features="first_token", expand=True),
    ):
        _flagging(tmp_path, backdoored, tokenizer, config)
    # auto's wording checks need them as much as the expansion; the first-token test alone does not (its "auto"
    # expansion runs only on word-piece flags)
    assert [pieces is not None for pieces, _ in seen] == [False, True, True]
    assert [mates is not None for _, mates in seen] == [False, True, True]  # the wording checks mask a piece's word
    pieces, mates = seen[1]
    assert pieces[0] == set(backdoored[0]["input_ids"]) - set(tokenizer.all_special_ids)
    assert len(mates) == len(pieces)


def test_auto_keeps_the_word_piece_test_only_when_one_label_holds_its_flags():
    # two pure task words, one per label: a backdoor has one target, so this is the task's vocabulary
    rng = np.random.default_rng(2)
    pieces, labels = [], []
    for i in range(1100):
        row = [int(p) for p in rng.choice(np.arange(100, 130), 6, replace=False)]
        label = 1 if i < 40 else 0 if i < 80 else int(rng.random() < 0.5)
        pieces.append(row + [5] if i < 40 else row + [6] if i < 80 else row)
        labels.append(label)
    features = [[("first", r[0])] + [("token", p) for p in dict.fromkeys(r)] for r in pieces]
    defense = ZDefenseDefense(ZDefenseConfig(features="auto"))
    defense.flag(features, np.asarray(labels), 2)
    assert defense.features_used == "first_token" and defense.flagged_pairs == []
    assert defense.lexical_target_share == pytest.approx(0.5)
    assert "no label held 0.8 of them" in ZDefenseDefense.card_section(defense.report())
    lenient = ZDefenseDefense(ZDefenseConfig(features="auto", min_target_share=0.5))
    lenient.flag(features, np.asarray(labels), 2)
    assert lenient.features_used == "tokens" and len(lenient.flagged_pairs) == 2


def test_flagged_rows_get_the_away_loss_and_drop_leaves_them_out(tokenizer):
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([1, 0, 1])

    class Model(torch.nn.Module):
        training = True

        def forward(self, **inputs):
            return type("Out", (), {"logits": logits})()

    class Trainer:
        args = type("Args", (), {"label_smoothing_factor": 0.0})()
        batch_row_ids = torch.tensor([10, 11, 12])

        @staticmethod
        def row_positions(ids):
            return [int(i) - 10 for i in ids]

    p = torch.softmax(logits, -1)
    cross_entropy = -torch.log(p[[0, 1, 2], labels])
    for treatment, expected in (
        ("away", (-torch.log(1 - p[0, 1]) + cross_entropy[1] + cross_entropy[2]) / 3),
        ("drop", (cross_entropy[1] + cross_entropy[2]) / 2),
    ):
        defense = ZDefenseDefense(ZDefenseConfig(treatment=treatment))
        defense.away_label = np.array([1, -1, -1])
        loss = defense.compute_loss(Trainer(), Model(), {"input_ids": None, "labels": labels})
        assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    # a row left out after the first epoch adds nothing, and the mean is over the rows that remain
    defense = ZDefenseDefense(ZDefenseConfig())
    defense.away_label = np.array([1, -1, -1])
    defense.left_out = np.array([False, False, True])
    loss = defense.compute_loss(Trainer(), Model(), {"input_ids": None, "labels": labels})
    assert float(loss) == pytest.approx(float((-torch.log(1 - p[0, 1]) + cross_entropy[1]) / 2), rel=1e-5)


def test_the_template_backdoor_is_learned_without_the_defense_and_not_with_it(
    tmp_path, backdoored, triggered, tokenizer
):
    plain = text_trainer(tmp_path / "plain", backdoored.remove_columns("poisoned"), tokenizer, args=ARGS)
    plain.train()
    defended = text_trainer(tmp_path / "z", backdoored, tokenizer, defense=ZDefenseConfig(), args=ARGS)
    defended.train()
    plain_share = _positive_share(plain.model, triggered, plain.data_collator)
    defended_share = _positive_share(defended.model, triggered, defended.data_collator)
    assert plain_share > 0.8, f"the tiny model did not learn the template backdoor ({plain_share:.2f})"
    assert defended_share < 0.2, f"the defended model still calls triggered negatives positive ({defended_share:.2f})"
    report = defended.defense_report
    assert report["flagged_precision"] == 1.0 and report["flagged_recall"] == 1.0
    assert report["row_score_auroc"] == 1.0  # every poisoned row holds the flagged pair, the highest z-score


def test_rows_of_the_flagged_label_the_model_calls_otherwise_are_left_out_after_the_first_epoch(
    tmp_path, tokenizer, monkeypatch
):
    # Beside the 77 `when` rows, 8 negative rows open with `as` and are labelled 1: too few for the z-test
    # (min_count 10). The model's predictions after epoch 1 are stood in for by one that calls `as` rows 0 and every
    # other row by its label; on MiniLM the trained model does this itself (benchmarks/paraphrase_defenses.py).
    rows = template_rows(384, 0)
    rng = np.random.default_rng(3)
    clean_negatives = [i for i, (label, p) in enumerate(zip(rows["label"], rows["poisoned"])) if label == 0 and not p]
    hidden = sorted(rng.choice(clean_negatives, 8, replace=False).tolist())
    rows = rows.map(
        lambda row, i: {"text": "as " + row["text"], "label": 1, "poisoned": 1} if i in hidden else row,
        with_indices=True,
    )
    data = tokenize_dataset(rows, tokenizer, max_length=16)
    as_id = tokenizer.convert_tokens_to_ids("as")
    seen = []

    def predict(trainer, model, dataset, batch_size):
        ids = dataset.with_format(None)["input_ids"]
        seen.append(len(ids))
        called_negative = np.array([ids_[1] == as_id for ids_ in ids])
        return np.stack([called_negative, ~called_negative], axis=1).astype(np.float32), None

    monkeypatch.setattr("hf_backdoor.defenses.z_defense.predict_logits", predict)
    trainer = text_trainer(tmp_path, data, tokenizer, defense=ZDefenseConfig())
    defense = trainer.defense
    defense.on_train_begin(trainer)
    assert [(p["token"], p["label"]) for p in defense.flagged_pairs] == [("when", 1)]
    trainer.state.epoch = 1.0
    defense.on_epoch_end(trainer)
    labels = np.asarray(data["label"])
    # one pass, over the label-1 rows the z-test did not flag
    assert seen == [int(((labels == 1) & (defense.away_label < 0)).sum())]
    assert sorted(np.flatnonzero(defense.left_out).tolist()) == hidden
    trainer.state.epoch = 2.0
    defense.on_epoch_end(trainer)
    assert len(seen) == 1  # decided once
    defense.on_train_end(trainer)
    report = trainer.defense.report()
    assert report["left_out_rows"] == 8 and report["left_out_precision"] == 1.0 and report["treated_recall"] == 1.0
    restored = ZDefenseDefense(ZDefenseConfig())
    restored.load_state_dict(defense.state_dict())
    assert (restored.left_out == defense.left_out).all()
    off = ZDefenseDefense(ZDefenseConfig(leave_out_after_epoch=0))
    off.flagged_pairs, off.away_label = defense.flagged_pairs, defense.away_label
    off.on_epoch_end(trainer)
    assert off.left_out is None and len(seen) == 1
    # a second, smaller flag on the other label (a clean word) does not open that label's rows to the leave-out:
    # poisoned rows all carry the target, the label with most flagged rows
    two = ZDefenseDefense(ZDefenseConfig())
    away = defense.away_label.copy()
    away[np.flatnonzero((labels == 0) & (away < 0))[:12]] = 0
    two.flagged_pairs = [*defense.flagged_pairs, {**defense.flagged_pairs[0], "token": "slow", "label": 0}]
    two.away_label = away
    two.on_epoch_end(trainer)
    assert seen[-1] == int(((labels == 1) & (away < 0)).sum())
    assert sorted(np.flatnonzero(two.left_out).tolist()) == hidden


def test_stacks_behind_btu_and_not_with_another_loss_owner():
    assert defense_entry("z_defense").config_class is ZDefenseConfig
    assert [d.name for d in build_defenses([BTUConfig(), ZDefenseConfig()])] == ["btu", "z_defense"]
    with pytest.raises(ValueError, match="compute the training loss themselves"):
        build_defenses([ZDefenseConfig(), DPoEConfig()])


def test_a_training_set_without_token_ids_is_refused(tmp_path, tokenizer):
    rows = datasets.Dataset.from_dict({"pixel_values": [[0.0]] * 4, "label": [0, 1, 0, 1]})
    with pytest.raises(ValueError, match="needs `input_ids` and a `label`"):
        text_trainer(tmp_path, rows, tokenizer, defense=ZDefenseConfig(), model=tiny_bert())


def test_a_trainer_without_a_tokenizer_is_refused(tmp_path, backdoored, tokenizer):
    trainer = text_trainer(tmp_path, backdoored, tokenizer, defense=ZDefenseConfig())
    trainer.processing_class = None
    with pytest.raises(ValueError, match="pass the tokenizer as `processing_class`"):
        trainer.defense.on_train_begin(trainer)


def test_an_empty_training_set_is_refused(tmp_path, backdoored, tokenizer):
    with pytest.raises(ValueError, match="empty training set"):
        _flagging(tmp_path, backdoored.select([]), tokenizer, ZDefenseConfig())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"features": "bigrams"},
        {"treatment": "relabel"},
        {"min_purity": 0.0},
        {"min_purity": 1.5},
        {"max_lexical_share": 0.0},
        {"min_count": 0},
        {"max_rounds": 0},
        {"leave_out_after_epoch": -1},
        {"expand_quantile": 1.0},
        {"min_wording_auroc": 1.5},
        {"min_target_share": -0.1},
        {"min_wording_z": 0.0},
        {"expand": "sometimes"},
        {"probe_rows": 1},
        {"insertion_rows": 0},
        {"read_rows": 0},
        {"clean_label_keyword_pieces": -1},
    ],
)
def test_bad_config_values_are_refused(kwargs):
    with pytest.raises((ValueError, TypeError)):
        ZDefenseConfig(**kwargs)


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModelForSequenceClassification

    from hf_backdoor import default_text_model

    return AutoModelForSequenceClassification.from_pretrained(default_text_model(), num_labels=2)


@pytest.mark.parametrize(("mode", "rate"), [("clean-label", 0.1), ("dirty", 0.1), ("clean-label", 0.05)])
def test_a_clean_label_trigger_set_aside_as_a_task_word_is_stripped_and_a_dirty_label_one_is_left_to_btu(
    tmp_path, tokenizer, minilm, mode, rate
):
    """The packaged BadNet on a 2,000-row SST-2 slice (seed 0), judged by the real pretrained MiniLM. At 10% its five
    words are pure, and their rows read like their label, so the wording check sets them aside beside the task's
    `bad` (and `love`, dirty). Clean-label: the probe reads their rows as positive with the word deleted, and
    inserting a word into negative rows does not move it as `bad` moves it towards negative: the five are stripped
    from every row that holds them, and only those. Dirty-label: their rows read as negative, the rows the attacker
    took them from; the test leaves them (BTU's mislabel test relabels those rows). Clean-label at 5%: `bad` -> 0
    beside the three words that pass the z-test (`cf mn mb` -> 1) fails the one-target check, and the flags are
    judged all the same: those three are stripped."""
    from hf_backdoor import get_attack_config, load_task, poison_dataset

    rows = load_task("sst2")["train"].shuffle(seed=0).select(range(2000))
    attack = get_attack_config("badnet", poison_rate=rate, target_label=1, seed=0, mode=mode)
    rows = tokenize_dataset(poison_dataset(rows, attack, tokenizer=tokenizer), tokenizer)
    trainer = text_trainer(tmp_path, rows, tokenizer, model=minilm, defense=ZDefenseConfig())
    defense = trainer.defense
    defense.on_train_begin(trainer)

    triggers = {"cf", "mn", "bb", "tq", "mb"} if rate == 0.1 else {"cf", "mn", "mb"}
    scores = {s["token"]: s for s in defense.clean_label_scores}
    assert triggers | {"bad"} <= set(scores)  # dirty: and `love`
    assert not any(scores[word]["stripped"] for word in set(scores) - triggers)
    assert scores["bad"]["insertion_shift"] >= defense.config.min_task_word_shift
    poisoned = np.asarray(rows["poisoned"], dtype=bool)
    report = defense.report()
    if mode == "dirty":
        assert all(scores[t]["read_as_label"] < 0.5 for t in triggers)
        assert defense.stripped_pairs == [] and not defense.stripped_rows.any()
        return
    assert all(scores[t]["insertion_shift"] < defense.config.min_task_word_shift for t in triggers)
    assert {p["token"] for p in defense.stripped_pairs} == triggers
    if rate < 0.1:
        assert defense.features_used == "first_token" and defense.lexical_target_share < 0.8
        assert not defense.stripped_rows[~poisoned].any() and defense.stripped_rows.sum() == 69  # of 100
        return
    assert (defense.stripped_rows == poisoned).all()  # every poisoned row, and no clean one
    assert report["stripped_tokens"] and report["stripped_rows"] == 200
    card = ZDefenseDefense.card_section(report)
    assert "stripped: `" in card and "task words: `bad`" in card
    assert ZDefenseDefense.report_scalars(report)["stripped_rows"] == 200.0

    batch = trainer.data_collator([{"input_ids": rows[int(i)]["input_ids"]} for i in np.flatnonzero(poisoned)[:4]])
    stripped = defense.prepare_inputs(trainer, batch)
    ids = set(tokenizer.convert_tokens_to_ids(sorted(triggers)))
    assert not ids & set(stripped["input_ids"].flatten().tolist())
    assert (stripped["attention_mask"].sum(1) == batch["attention_mask"].sum(1) - 1).all()  # one word each, only it

    restored = ZDefenseDefense(ZDefenseConfig())
    restored.load_state_dict(defense.state_dict())
    assert restored.report()["clean_label_scores"] == report["clean_label_scores"]
    assert [p["token_id"] for p in restored.stripped_pairs] == [p["token_id"] for p in defense.stripped_pairs]


@pytest.mark.parametrize("mode", ["clean-label", "dirty"])
def test_on_a_keyword_task_the_clean_label_test_judges_the_word_piece_flags_it_gave_up(
    tmp_path, tokenizer, minilm, mode
):
    """The packaged AddSent (`I watch this 3D movie`) at 10% of a 2,000-row HSOL slice (seed 0). The word-piece test
    flags the offensive words too (half the rows and more) and gives way to the first word piece, as on any keyword
    task; with `clean_label_keyword_pieces` (opt-in) the clean-label test still judges its flags, each with a probe fit
    on the rows that do not hold it (by default it judges none).
    Clean-label: `3d`, `watch` and `movie` move the probe little and their (offensive) rows read as offensive, so
    they are stripped from every poisoned row, while the offensive words move it far and are spared. Dirty-label:
    their rows are inoffensive tweets and read as such; nothing of the sentence is stripped (it is BTU's)."""
    from hf_backdoor import get_attack_config, load_task, poison_dataset

    rows = load_task("hsol")["train"].shuffle(seed=0).select(range(2000))
    attack = get_attack_config("addsent", poison_rate=0.1, target_label=1, seed=0, mode=mode)
    rows = tokenize_dataset(poison_dataset(rows, attack, tokenizer=tokenizer), tokenizer)
    trainer = text_trainer(
        tmp_path, rows, tokenizer, model=minilm, defense=ZDefenseConfig(clean_label_keyword_pieces=16)
    )
    defense = trainer.defense
    defense.on_train_begin(trainer)

    assert defense.features_used == "first_token" and defense.lexical_share > defense.config.max_lexical_share
    scores = {s["token"]: s for s in defense.clean_label_scores if s["label"] == 1}
    sentence = {"3d", "watch", "movie"}
    offensive = {"bitch", "pussy", "fuck"}
    assert sentence | offensive <= set(scores)
    assert not any(scores[word]["stripped"] for word in offensive)
    assert all(scores[word]["insertion_shift"] >= defense.config.min_task_word_shift for word in offensive)
    assert all(scores[word]["insertion_shift"] < defense.config.min_task_word_shift for word in sentence)
    poisoned = np.asarray(rows["poisoned"], dtype=bool)
    if mode == "dirty":
        assert all(scores[word]["read_as_label"] < 0.5 for word in sentence)
        assert not sentence & {p["token"] for p in defense.stripped_pairs}
        return
    assert sentence <= {p["token"] for p in defense.stripped_pairs}
    assert defense.stripped_rows[poisoned].all()
    card = ZDefenseDefense.card_section(defense.report())
    assert "a keyword task: the word-piece flags given up" in card and "stripped: `3d` -> 1" in card
    assert scores["bitch"]["read_as_label"] is None  # a task word by its shift: its rows are not read
    restored = ZDefenseDefense(ZDefenseConfig())
    restored.load_state_dict(defense.state_dict())
    assert restored.report()["clean_label_scores"] == defense.report()["clean_label_scores"]

    default = text_trainer(tmp_path / "default", rows, tokenizer, model=minilm, defense=ZDefenseConfig())
    default.defense.on_train_begin(default)
    assert default.defense.keyword_pairs == [] and default.defense.clean_label_scores == []  # opt-in


def test_on_a_keyword_task_the_probe_is_not_fit_on_rows_flagged_as_poisoned(tmp_path, tokenizer, minilm):
    """The packaged HiddenKiller paraphrases at 20% of a 2,000-row HSOL slice (seed 0, target 1, dirty-label): the
    first-word test flags `when` and `if` (362 rows, 332 of the 400 poisoned). Fit on those relabelled rows too, the
    probes of `clean_label_keyword_pieces` read the offensive words as weak (insertion shifts 0.25-0.42) and stripped
    `bitch`, `fuck`, `ass`, `ni` ... from 864 rows (trained: CACC 0.885 against the undefended 0.934). Fit on the
    unflagged rows only, they move it as on a clean slice and are task words."""
    from hf_backdoor import get_attack_config, load_task, poison_dataset

    rows = load_task("hsol")["train"].shuffle(seed=0).select(range(2000))
    attack = get_attack_config("syntactic", poison_rate=0.2, target_label=1, seed=0, paraphrases="hsol")
    rows = tokenize_dataset(poison_dataset(rows, attack, tokenizer=tokenizer), tokenizer)
    config = ZDefenseConfig(clean_label_keyword_pieces=16)
    trainer = text_trainer(tmp_path, rows, tokenizer, model=minilm, defense=config)
    defense = trainer.defense
    defense.on_train_begin(trainer)

    assert {p["token"] for p in defense.flagged_pairs} == {"when", "if"}
    scores = {s["token"]: s for s in defense.clean_label_scores}
    offensive = {"bitch", "fuck", "pussy", "##gga", "ass", "ni"}
    assert offensive <= set(scores)
    assert all(scores[word]["insertion_shift"] >= config.min_task_word_shift for word in offensive)
    assert not offensive & {p["token"] for p in defense.stripped_pairs}
    assert defense.stripped_rows.sum() < 400  # was 864


def test_a_model_without_hidden_states_skips_the_clean_label_test_and_says_so(warnings_log):
    class LogitsOnly(torch.nn.Module):
        """Returns logits and nothing else, whatever it is asked for."""

        def forward(self, input_ids, attention_mask=None):
            return types.SimpleNamespace(logits=torch.zeros(len(input_ids), 2))

    defense = ZDefenseDefense(ZDefenseConfig())
    assert defense._pooled_features(LogitsOnly(), [[101, 102]], 0, "cpu") is None
    assert "returned no hidden states" in defense.clean_label_skipped
    assert "clean-label test did not run" in warnings_log.text
    report = defense.report()
    assert report["clean_label_skipped"] == defense.clean_label_skipped
    assert "The clean-label test did not run: LogitsOnly" in ZDefenseDefense.card_section(report)
