"""What Z-defense flags on a packaged training slice, before any training (no model is trained).

    python benchmarks/z_defense_flags.py --dataset hsol --attack none --seed 0
    python benchmarks/z_defense_flags.py --dataset hsol --attack syntactic --poison-rate 0.2 --features tokens
    python benchmarks/z_defense_flags.py --dataset sst2 --attack style --poison-rate 0.2
    python benchmarks/z_defense_flags.py --dataset sst2 --attack style --poison-rate 0.1 --min-wording-z 2.5
    python benchmarks/z_defense_flags.py --dataset agnews --features first_token --expand always
    python benchmarks/z_defense_flags.py --dataset sst2 --attack badnet --poison-rate 0.1 --attack-kwargs '{"mode": "clean-label"}'
    python benchmarks/z_defense_flags.py --dataset hsol --attack addsent --poison-rate 0.1 --attack-kwargs '{"mode": "clean-label"}' --keyword-pieces 16

Builds the same seeded slice as ``paraphrase_defenses.py`` (poisoned with the packaged release when ``--attack`` is
not ``none``), tokenizes it with the default MiniLM tokenizer and runs ``ZDefenseDefense``'s z-test on it. Prints
the flagged (word piece, label) pairs with their row counts and z-scores, the rows that would be trained away from
their label, and, on poisoned data, how many of them are poisoned. The clean-label test of the set-aside word pieces
runs on the pretrained MiniLM, as in training (``--no-clean-label-test`` skips it). Nothing is written: the flags of a
training run are in its defense report.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from transformers import AutoModel

from hf_backdoor import default_text_model, load_task, poison_dataset
from hf_backdoor.defenses._shared.tokens import pooled_features
from hf_backdoor.defenses.z_defense import (
    EXPANSIONS,
    FEATURES,
    ZDefenseConfig,
    ZDefenseDefense,
    continuation_ids,
    row_features,
    row_pieces,
    row_word_mates,
    z_scores,
)
from hf_backdoor.models import load_text_tokenizer, tokenize_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: benchmarks/, not installed
from benchmarks.paraphrase_defenses import _attack, _attack_kwargs  # noqa: E402  (the same attack settings)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="sst2")
    parser.add_argument("--attack", default="none", help="none, or a packaged attack (syntactic, badnet, ...)")
    parser.add_argument("--poison-rate", type=float, default=0.2)
    parser.add_argument(
        "--attack-kwargs",
        default="{}",
        help='other fields of the attack config, as JSON (as in paraphrase_defenses.py): \'{"mode": "clean-label"}\'',
    )
    parser.add_argument("--max-train-samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--features", default="auto", choices=FEATURES)
    parser.add_argument(
        "--expand", default="auto", choices=EXPANSIONS, help="ZDefenseConfig.expand: the word-piece classifier"
    )
    parser.add_argument(
        "--min-wording-z",
        type=float,
        default=None,
        help="ZDefenseConfig.min_wording_z: flag word pieces from this z-score (a low-rate style)",
    )
    parser.add_argument(
        "--no-clean-label-test",
        action="store_true",
        help="skip ZDefenseConfig.clean_label_test (the probe on the pretrained model; no model is loaded)",
    )
    parser.add_argument(
        "--keyword-pieces",
        type=int,
        default=0,
        help="ZDefenseConfig.clean_label_keyword_pieces: on a keyword task, the word-piece flags the clean-label "
        "test judges (opt-in)",
    )
    parser.add_argument(
        "--top-z",
        type=int,
        default=0,
        help="also print the N (word piece, label) pairs of highest z-score in the first round, flagged or not",
    )
    args = parser.parse_args(argv)
    tokenizer = load_text_tokenizer(default_text_model())
    rows = load_task(args.dataset)["train"].shuffle(seed=args.seed)
    rows = rows.select(range(min(args.max_train_samples, len(rows))))
    if args.attack != "none":
        rows = poison_dataset(
            rows,
            _attack(args.attack, args.dataset, args.poison_rate, args.seed, _attack_kwargs(args)),
            tokenizer=tokenizer,
        )
    tokenized = tokenize_dataset(rows, tokenizer)
    labels = np.asarray(tokenized["label"], dtype=np.int64)
    defense = ZDefenseDefense(
        ZDefenseConfig(
            features=args.features,
            expand=args.expand,
            min_wording_z=args.min_wording_z,
            clean_label_test=not args.no_clean_label_test,
            clean_label_keyword_pieces=args.keyword_pieces,
        )
    )
    special = set(tokenizer.all_special_ids)
    features = [row_features(ids, special, args.features) for ids in tokenized["input_ids"]]
    pieces = [row_pieces(ids, special) for ids in tokenized["input_ids"]]
    continuing = continuation_ids(tokenizer)
    mates = [row_word_mates(ids, special, continuing) for ids in tokenized["input_ids"]]
    defense.flag(features, labels, len(rows.features["label"].names), tokenizer, pieces=pieces, mates=mates)
    if defense.config.clean_label_test and args.features == "auto":
        model = AutoModel.from_pretrained(default_text_model()).eval()
        defense.judge_clean_label(
            tokenized["input_ids"],
            labels,
            pieces,
            continuing,
            lambda rows: pooled_features(model, rows, tokenizer.pad_token_id, "cpu"),
            len(rows.features["label"].names),
        )
    flagged = defense.away_label >= 0
    used = defense.features_used
    if defense.lexical_share is not None:
        used += f" (the word-piece test flagged {defense.lexical_share:.1%} of the rows)"
    if defense.expansion is not None:
        used += (
            f"; expansion: AUROC {defense.expansion['auroc']:.3f}, {defense.expansion['rows']} more rows of label "
            f"{defense.expansion['label']}"
        )
    print(f"{args.dataset} / attack {args.attack} / seed {args.seed} / {len(labels)} rows / {args.features}: {used}")
    for pair in defense.set_aside_pairs:
        print(
            f"  {pair['token']!r:>14} -> {pair['label']}  set aside: its rows read like their label, AUROC {pair['wording_auroc']:.3f}"
        )
    for score in defense.clean_label_scores:
        print(
            f"  {score['token']!r:>14} -> {score['label']}  clean-label test: "
            + ("" if score["read_as_label"] is None else f"rows read as label {score['read_as_label']:.2f}, ")
            + f"insertion shift {score['insertion_shift']:+.3f}: "
            + ("stripped" if score["stripped"] else "a task word")
        )
    for pair in defense.flagged_pairs:
        print(
            f"  {pair['token']!r:>14} -> {pair['label']}  {pair['rows_with_label']}/{pair['rows']} rows  z {pair['z']:.2f}  "
            f"round {pair['round']}"
        )
    out = {
        "flagged_pairs": defense.flagged_pairs,
        "flagged_rows": int(flagged.sum()),
        "features_used": defense.features_used,
        "lexical_share": defense.lexical_share,
        "set_aside_pairs": defense.set_aside_pairs,
        "expansion": defense.expansion,
        "clean_label_scores": defense.clean_label_scores,
    }
    line = f"  rows trained away from their label: {int(flagged.sum())}"
    if "poisoned" in tokenized.column_names:
        poisoned = np.asarray(tokenized["poisoned"], dtype=bool)
        out.update(poisoned_flagged=int(flagged[poisoned].sum()), clean_flagged=int(flagged[~poisoned].sum()))
        line += f" ({out['poisoned_flagged']} of {int(poisoned.sum())} poisoned, {out['clean_flagged']} clean)"
    print(line)
    if defense.stripped_rows is not None and defense.stripped_rows.any():
        stripped = defense.stripped_rows
        line = f"  rows holding a stripped piece: {int(stripped.sum())}"
        if "poisoned" in tokenized.column_names:
            line += f" ({int(stripped[poisoned].sum())} of {int(poisoned.sum())} poisoned)"
        print(line)
    if args.top_z:
        out["top_z"] = _top_z(tokenized, pieces, labels, len(rows.features["label"].names), tokenizer, args.top_z)
    return out


def _top_z(tokenized, pieces: list[set[int]], labels: np.ndarray, num_labels: int, tokenizer, n: int) -> list[dict]:
    """The ``n`` (word piece, label) pairs of highest z-score against the training set's label shares (round 1 of
    the z-test), with their row counts, purity and, on poisoned data, how many of their rows are poisoned;
    ``pieces`` are the rows' word pieces (:func:`row_pieces`)."""
    poisoned = (
        np.asarray(tokenized["poisoned"], dtype=bool)
        if "poisoned" in tokenized.column_names
        else np.zeros(len(labels), dtype=bool)
    )
    counts: dict[int, np.ndarray] = {}
    poisoned_rows: dict[int, int] = {}
    for row, label, is_poisoned in zip(pieces, labels, poisoned):
        for piece in row:
            counts.setdefault(piece, np.zeros(num_labels))[label] += 1
            poisoned_rows[piece] = poisoned_rows.get(piece, 0) + int(is_poisoned)
    prior = np.bincount(labels, minlength=num_labels) / len(labels)
    pairs = []
    for piece, by_label in counts.items():
        total = by_label.sum()
        z = z_scores(total, by_label, prior)
        for label in range(num_labels):
            pairs.append(
                {
                    "token": tokenizer.convert_ids_to_tokens(piece),
                    "label": label,
                    "z": round(float(z[label]), 3),
                    "rows": int(total),
                    "purity": round(float(by_label[label] / total), 3),
                    "poisoned_rows": poisoned_rows[piece],
                }
            )
    pairs = sorted(pairs, key=lambda p: -p["z"])[:n]
    print(f"  the {n} pairs of highest z (round 1, every word piece):")
    for p in pairs:
        print(
            f"  {p['token']!r:>14} -> {p['label']}  z {p['z']:.2f}  {p['rows']} rows  purity {p['purity']:.2f}  "
            f"poisoned rows {p['poisoned_rows']}"
        )
    return pairs


if __name__ == "__main__":
    main()
