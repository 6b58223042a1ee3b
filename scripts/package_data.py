"""Build the compact offline copies of the text tasks shipped in ``hf_backdoor/data/packaged``.

Run from the repository root with ``../shared`` beside it::

    python scripts/package_data.py --shared ../shared/data

Every draw is seeded (``SEED``) so the packaged files can be rebuilt byte for byte. What is drawn from where is
written into ``hf_backdoor/data/packaged/MANIFEST.json`` and summarised in the README.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

SEED = 20241124
OUT = Path(__file__).resolve().parents[1] / "hf_backdoor" / "data" / "packaged"


def read_tsv(path: Path) -> pd.DataFrame:
    # The shared TSVs are unquoted; pandas' default quoting silently merges rows.
    return pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False, dtype={"text": str})


def stratified_sample(df: pd.DataFrame, per_class: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    picked = []
    for label in sorted(df.label.unique()):
        rows = np.flatnonzero(df.label.to_numpy() == label)
        picked.append(rng.choice(rows, size=min(per_class, len(rows)), replace=False))
    order = np.concatenate(picked)
    rng.shuffle(order)
    return df.iloc[order]


def write(df: pd.DataFrame, task: str, name: str, manifest: dict, note: str) -> None:
    path = OUT / task / f"{name}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    df = df.reset_index(drop=True)
    df.to_parquet(path, index=False, compression="zstd")
    entry = {"rows": len(df), "source": note, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    if "label" in df:
        entry["label_counts"] = {int(k): int(v) for k, v in df.label.value_counts().sort_index().items()}
    manifest.setdefault(task, {})[name] = entry


def paraphrase_table(pairs: list[tuple[pd.Series, pd.Series]]) -> pd.DataFrame:
    texts = pd.concat([t for t, _ in pairs], ignore_index=True)
    paraphrases = pd.concat([p for _, p in pairs], ignore_index=True)
    table = pd.DataFrame({"text": texts, "paraphrase": paraphrases})
    table = table[table.paraphrase.str.strip() != ""]
    return table.drop_duplicates("text")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", type=Path, default=Path("../shared/data"))
    args = parser.parse_args()
    text = args.shared / "text"
    clean, btu, poisoned = text / "clean", text / "btu_release", text / "poisoned"
    manifest: dict = {"seed": SEED}
    cols = ["text", "label"]

    # SST-2: the 6,920/872/1,821 sentence-level split of HiddenKiller/StyleBkd/ONION, whole.
    sst2 = {s: read_tsv(clean / f"sst2_{s}.tsv")[cols] for s in ("train", "dev", "test")}
    for split, name in (("train", "train"), ("dev", "validation"), ("test", "test")):
        write(sst2[split], "sst2", name, manifest, f"text/clean/sst2_{split}.tsv (all rows)")
    # btu_release rows are row-aligned with the clean split (same labels), a few differ in spacing, so key them by
    # the clean text. Syntactic: the BTU authors' SCPN train/dev paraphrases; HiddenKiller's SCPN test file covers
    # the 912 negatives in order. Style: StyleBkd's own Bible transfers on every split (aligned through clean_idx).
    # The BTU release's sst2_style rewrites are not Bible style (a Bible marker word such as "unto" or "thy" in 0.2%
    # of them, as in the clean text, against 19% of StyleBkd's; tests/test_data.py): training on them while testing
    # on StyleBkd's rows was testing a different trigger from the one trained on.
    negatives = sst2["test"][sst2["test"].label == 0].text.reset_index(drop=True)
    hk_test = read_tsv(poisoned / "syntactic_hiddenkiller" / "sst2_test.tsv").text
    assert len(negatives) == len(hk_test)
    pairs = [
        (sst2[s].text.reset_index(drop=True), read_tsv(btu / f"sst2_syntactic_{s}.tsv").paraphrase)
        for s in ("train", "dev")
    ]
    write(
        paraphrase_table([*pairs, (negatives, hk_test)]),
        "sst2",
        "paraphrases_syntactic",
        manifest,
        "btu_release/sst2_syntactic_{train,dev}.tsv + syntactic_hiddenkiller/sst2_test.tsv",
    )
    pairs = []
    for split in ("train", "dev", "test"):
        bible = read_tsv(poisoned / "style_stylebkd" / f"bible_sst2_{split}.tsv")
        aligned = sst2[split].iloc[bible.clean_idx.to_numpy()]
        assert (aligned.label.to_numpy() == bible.label.to_numpy()).all()
        pairs.append((aligned.text.reset_index(drop=True), bible.text))
    write(
        paraphrase_table(pairs),
        "sst2",
        "paraphrases_style",
        manifest,
        "style_stylebkd/bible_sst2_{train,dev,test}.tsv (StyleBkd's Bible transfers, aligned through clean_idx)",
    )

    # HSOL (the BTU/EBYD "Twitter" set): released dev == test, so validation is a stratified 10% slice of train.
    hsol_train = read_tsv(btu / "hsol_train.tsv")[cols]
    hsol_test = read_tsv(btu / "hsol_test.tsv")[cols]
    val = stratified_sample(hsol_train, per_class=291, seed=SEED)
    write(hsol_train.drop(val.index), "hsol", "train", manifest, "btu_release/hsol_train.tsv minus the validation rows")
    write(val, "hsol", "validation", manifest, "btu_release/hsol_train.tsv, 291 rows per class (seeded)")
    write(hsol_test, "hsol", "test", manifest, "btu_release/hsol_test.tsv (all rows; identical to the released dev)")
    for kind in ("syntactic", "style"):
        pairs = [
            (read_tsv(btu / f"hsol_{kind}_{s}.tsv").text, read_tsv(btu / f"hsol_{kind}_{s}.tsv").paraphrase)
            for s in ("train", "dev")
        ]
        write(
            paraphrase_table(pairs),
            "hsol",
            f"paraphrases_{kind}",
            manifest,
            f"btu_release/hsol_{kind}_{{train,dev}}.tsv",
        )

    # OLID (OffensEval-2019 A): HiddenKiller's split, whole.
    for split, name in (("train", "train"), ("dev", "validation"), ("test", "test")):
        write(
            read_tsv(clean / f"olid_{split}.tsv")[cols],
            "olid",
            name,
            manifest,
            f"text/clean/olid_{split}.tsv (all rows)",
        )
    olid_test = read_tsv(clean / "olid_test.tsv")
    olid_hk = read_tsv(poisoned / "syntactic_hiddenkiller" / "olid_test.tsv").text
    olid_neg = olid_test[olid_test.label == 0].text.reset_index(drop=True)
    if len(olid_neg) == len(olid_hk):
        write(
            paraphrase_table([(olid_neg, olid_hk)]),
            "olid",
            "paraphrases_syntactic",
            manifest,
            "syntactic_hiddenkiller/olid_test.tsv (test negatives only; the released train paraphrases are unaligned)",
        )

    # AG News: class-balanced seeded subsets, to keep the package small and CPU runs short.
    ag = {s: read_tsv(clean / f"agnews_{s}.tsv")[cols] for s in ("train", "dev", "test")}
    bible = {s: read_tsv(poisoned / "style_stylebkd" / f"bible_agnews_{s}.tsv") for s in ("train", "dev", "test")}
    sizes = {"train": 1000, "dev": 200, "test": 500}
    pairs = []
    for split, name in (("train", "train"), ("dev", "validation"), ("test", "test")):
        sub = stratified_sample(ag[split], per_class=sizes[split], seed=SEED)
        write(sub, "agnews", name, manifest, f"text/clean/agnews_{split}.tsv, {sizes[split]} rows per class (seeded)")
        pairs.append((ag[split].text, bible[split].text))  # Bible files are row-aligned with the clean ones
    table = paraphrase_table(pairs)
    kept = set(
        pd.concat([pd.read_parquet(OUT / "agnews" / f"{n}.parquet").text for n in ("train", "validation", "test")])
    )
    write(
        table[table.text.isin(kept)],
        "agnews",
        "paraphrases_style",
        manifest,
        "style_stylebkd/bible_agnews_*.tsv (packaged rows)",
    )

    # IMDB: class-balanced seeded subsets of the shared 5,000/2,000 subset (reviews are long).
    imdb_train = read_tsv(clean / "imdb_train.tsv")[cols]
    imdb_test = read_tsv(clean / "imdb_test.tsv")[cols]
    train = stratified_sample(imdb_train, per_class=1000, seed=SEED)
    rest = imdb_train.drop(train.index)
    write(train, "imdb", "train", manifest, "text/clean/imdb_train.tsv, 1,000 per class (seeded)")
    write(
        stratified_sample(rest, per_class=250, seed=SEED + 1),
        "imdb",
        "validation",
        manifest,
        "text/clean/imdb_train.tsv rows not in train, 250 per class (seeded)",
    )
    write(
        stratified_sample(imdb_test, per_class=500, seed=SEED),
        "imdb",
        "test",
        manifest,
        "text/clean/imdb_test.tsv, 500 per class (seeded)",
    )

    (OUT / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    total = sum(p.stat().st_size for p in OUT.rglob("*.parquet"))
    print(f"wrote {OUT} ({total / 2**20:.2f} MiB)")


if __name__ == "__main__":
    main()
