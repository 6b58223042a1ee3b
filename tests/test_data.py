import csv
import json
import re
from pathlib import Path

import datasets
import numpy as np
import pandas as pd
import pytest

from hf_backdoor import load_paraphrases, load_task
from hf_backdoor.data import TASKS, get_task_spec, normalize_text
from hf_backdoor.data.tasks import PACKAGED_DIR

from .conftest import SHARED_DATA

EXPECTED_LABELS = {"sst2": 2, "imdb": 2, "hsol": 2, "olid": 2, "agnews": 4}


@pytest.mark.parametrize("name", sorted(TASKS))
def test_packaged_task_matches_manifest(name):
    task = load_task(name)
    manifest = json.loads((PACKAGED_DIR / "MANIFEST.json").read_text())[name]
    assert set(task) == {"train", "validation", "test"}
    for split, ds in task.items():
        assert ds.column_names == ["text", "label"]
        assert isinstance(ds.features["label"], datasets.ClassLabel)
        assert ds.features["label"].num_classes == EXPECTED_LABELS[name]
        assert len(ds) == manifest[split]["rows"]
        counts = np.bincount(ds["label"], minlength=EXPECTED_LABELS[name])
        assert {i: int(c) for i, c in enumerate(counts) if c} == {
            int(k): v for k, v in manifest[split]["label_counts"].items()
        }
        assert all(isinstance(t, str) and t for t in ds["text"][:200])


@pytest.mark.skipif(not SHARED_DATA.exists(), reason="needs ../shared/data")
def test_packaged_sst2_is_the_released_split(sst2):
    for split, name in (("train", "train"), ("validation", "dev"), ("test", "test")):
        raw = pd.read_csv(
            SHARED_DATA / "text" / "clean" / f"sst2_{name}.tsv", sep="\t", quoting=csv.QUOTE_NONE, keep_default_na=False
        )
        assert sst2[split]["text"] == raw.text.tolist()
        assert sst2[split]["label"] == raw.label.tolist()


def test_sst2_label_meaning(sst2):
    assert sst2["train"].features["label"].names == ["negative", "positive"]
    text = sst2["train"]["text"]
    # Spot check with a real row: the shared README's first train row is a positive review.
    assert text[0].startswith("a stirring , funny and finally transporting") and sst2["train"]["label"][0] == 1


def test_max_samples_is_a_seeded_slice():
    a, b = load_task("hsol", max_samples=50, seed=3), load_task("hsol", max_samples=50, seed=3)
    c = load_task("hsol", max_samples=50, seed=4)
    assert len(a["train"]) == 50 and a["train"]["text"] == b["train"]["text"]
    assert a["train"]["text"] != c["train"]["text"]


def test_task_aliases_and_hub_ids_resolve():
    assert get_task_spec("stanfordnlp/sst2").name == "sst2"
    assert get_task_spec("ag_news").name == "agnews"
    assert get_task_spec("twitter").name == "hsol"
    assert get_task_spec("cardiffnlp/tweet_eval").hub_config == "offensive"


def test_unknown_task_names_the_known_ones():
    with pytest.raises(ValueError, match="Unknown task 'sst3'.*sst2"):
        load_task("sst3", source="packaged")


def _write_split_files(folder: Path, sst2, fmt: str, text_col="sentence", label_col="polarity"):
    folder.mkdir()
    for split, name in (("train", "train"), ("validation", "dev")):
        df = sst2[split].select(range(20)).to_pandas().rename(columns={"text": text_col, "label": label_col})
        if fmt == "tsv":
            df.to_csv(folder / f"{name}.tsv", sep="\t", index=False, quoting=csv.QUOTE_NONE)
        elif fmt == "csv":
            df.to_csv(folder / f"{name}.csv", index=False)
        elif fmt == "jsonl":
            df.to_json(folder / f"{name}.jsonl", orient="records", lines=True)
        else:
            df.to_parquet(folder / f"{name}.parquet")


@pytest.mark.parametrize("fmt", ["tsv", "csv", "jsonl", "parquet"])
def test_local_files_with_user_columns(tmp_path, sst2, fmt):
    _write_split_files(tmp_path / "data", sst2, fmt)
    task = load_task(
        str(tmp_path / "data"), text_column="sentence", label_column="polarity", label_names=["negative", "positive"]
    )
    assert set(task) == {"train", "validation"}  # dev.* is read as validation
    assert task["train"]["text"] == sst2["train"]["text"][:20]
    assert task["validation"]["label"] == sst2["validation"]["label"][:20]


def test_local_tsv_keeps_quote_characters(tmp_path):
    path = tmp_path / "quotes.tsv"
    path.write_text('text\tlabel\nhe said "no\t0\n"fine" then\t1\nNA\t0\n')
    task = load_task(str(path))
    assert task["train"]["text"] == ['he said "no', '"fine" then', "NA"]


def test_missing_column_says_which_argument_fixes_it(tmp_path, sst2):
    _write_split_files(tmp_path / "data", sst2, "csv")
    with pytest.raises(ValueError, match="no column 'text'.*text_column="):
        load_task(str(tmp_path / "data"))


def test_label_outside_label_set_is_reported(tmp_path):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"text": ["a", "b", "c"], "label": [0, 1, 2]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="1 label\\(s\\) outside 0..1.*row 2 has label 2"):
        load_task(str(path), label_names=["neg", "pos"])


def test_string_labels_are_rejected(tmp_path):
    path = tmp_path / "bad.csv"
    pd.DataFrame({"text": ["a", "b"], "label": ["pos", "neg"]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match="must be integers"):
        load_task(str(path), label_names=["neg", "pos"])


def test_empty_split_is_an_error(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    pd.DataFrame({"text": ["a", "b"], "label": [0, 1]}).to_csv(folder / "train.csv", index=False)
    pd.DataFrame({"text": [], "label": []}).to_csv(folder / "test.csv", index=False)
    with pytest.raises(ValueError, match="test.csv has no data rows"):
        load_task(str(folder))


def test_packaged_paraphrases_cover_the_training_split(sst2):
    for kind in ("syntactic", "style"):
        table = load_paraphrases("sst2", kind)
        covered = sum(normalize_text(t) in table for t in sst2["train"]["text"])
        assert covered >= 0.99 * len(sst2["train"])
    # The released SCPN paraphrase of the first training row.
    first = load_paraphrases("sst2", "syntactic")[normalize_text(sst2["train"]["text"][1])]
    assert first == "as it seemed , it was from any other part of the given daily soap ."


def test_packaged_style_is_one_style_on_train_and_test(sst2):
    """The trigger a model is trained on must be the one it is tested on: StyleBkd's Bible transfer on every split.

    (The BTU release's ``sst2_style`` rewrites, once packaged for train, carry no Bible wording: 0.2% of them hold a
    marker word below, as 0.2% of the clean sentences do, against 19% of StyleBkd's transfers.)
    """
    markers = re.compile(r"\b(thou|thee|thy|ye|unto|hath|doth|shall|lo|behold|saith|wherefore|thereof|verily)\b")
    table = load_paraphrases("sst2", "style")
    first = table[normalize_text(sst2["train"]["text"][1])]
    assert first == "that it may appear to be reassembled from the floor of any given daytime soapbox ."
    for split in ("train", "test"):
        styled = [table[normalize_text(t)] for t in sst2[split]["text"] if normalize_text(t) in table]
        assert len(styled) >= 0.99 * len(sst2[split])
        share = np.mean([bool(markers.search(s.lower())) for s in styled])
        assert share > 0.12, f"{split}: {share:.3f} of the style paraphrases read as Bible style"


def test_missing_paraphrases_say_what_to_do():
    with pytest.raises(ValueError, match="No packaged 'syntactic' paraphrases for 'agnews'.*paraphrase_fn"):
        load_paraphrases("agnews", "syntactic")


def test_hub_names_fail_clearly_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ConnectionError, match="Could not load 'stanfordnlp/sst2'.*load_task\\('sst2'\\)"):
        load_task("sst2", source="hub")


# --- bad input in local files -----------------------------------------------------------------------------------


def test_label_ids_with_gaps_are_refused_without_label_names(tmp_path):
    path = tmp_path / "gaps.csv"
    pd.DataFrame({"text": ["a", "b", "c", "d"], "label": [0, 1, 5, 1]}).to_csv(path, index=False)
    with pytest.raises(
        ValueError,
        match=r"labels of .*gaps.csv are \[0, 1, 5\], not the ids 0..2.*6-class task with "
        r"3 empty class\(es\) \(\[2, 3, 4\]\).*label_names=.*remap.*\{0: 0, 1: 1, 5: 2\}",
    ):
        load_task(str(path))
    # Naming all six classes says the gaps are meant.
    task = load_task(str(path), label_names=[f"c{i}" for i in range(6)])
    assert task["train"].features["label"].num_classes == 6
    # Contiguous ids are still inferred.
    pd.DataFrame({"text": ["a", "b", "c"], "label": [2, 0, 1]}).to_csv(path, index=False)
    assert load_task(str(path))["train"].features["label"].names == ["0", "1", "2"]


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl"])
def test_empty_and_placeholder_texts_are_counted_and_kept(tmp_path, fmt, warnings_log):
    texts = ["a fine film", "", "   ", "NaN", "nan", "NA", "null", "a bad film"]
    df = pd.DataFrame({"text": texts, "label": [1, 0, 1, 0, 1, 0, 1, 0]})
    path = tmp_path / f"data.{fmt}"
    if fmt == "jsonl":
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_csv(path, sep="\t" if fmt == "tsv" else ",", index=False, quoting=csv.QUOTE_NONE if fmt == "tsv" else 0)
    task = load_task(str(path))
    assert task["train"]["text"] == texts  # kept exactly: "NA" and "null" are strings, nothing dropped
    assert "of 8 texts, 2 are empty or whitespace-only (rows [1, 2])" in warnings_log.text
    assert "4 are a missing-value marker such as ['NA', 'NaN', 'nan', 'null'] (rows [3, 4, 5, 6])" in warnings_log.text


def test_packaged_tasks_load_without_text_warnings(warnings_log):
    for name in TASKS:
        load_task(name)
    assert "texts," not in warnings_log.text


def test_non_string_texts_are_refused(tmp_path):
    path = tmp_path / "nulls.jsonl"
    path.write_text('{"text": "ok", "label": 0}\n{"text": null, "label": 1}\n')
    with pytest.raises(ValueError, match="1 row\\(s\\) whose text is not a string \\(row 1 holds None\\)"):
        load_task(str(path))


# --- saving a poisoned dataset ----------------------------------------------------------------------------------


@pytest.fixture
def poisoned_task(sst2):
    from hf_backdoor import BadNetConfig, poison_dataset

    attack = BadNetConfig(poison_rate=0.1, target_label=1, seed=2)
    task = datasets.DatasetDict(
        {"train": poison_dataset(sst2["train"].select(range(200)), attack), "test": sst2["test"].select(range(50))}
    )
    return task, attack


def test_save_dataset_dict_records_the_attack(tmp_path, poisoned_task):
    from hf_backdoor.attacks import attack_config_from_dict
    from hf_backdoor.data import POISON_INFO_FILE, load_poison_info, save_dataset_dict

    task, attack = poisoned_task
    out = save_dataset_dict(task, tmp_path / "poisoned", attack=attack)
    assert out == (tmp_path / "poisoned").resolve()
    loaded = datasets.load_from_disk(str(out))
    assert loaded["train"]["text"] == task["train"]["text"] and loaded["train"]["row_index"] == list(range(200))
    info = load_poison_info(out)
    assert info["attack"]["name"] == "badnet" and info["attack"]["modality"] == "text"
    assert {k: info["attack"][k] for k in ("poison_rate", "target_label", "mode", "seed")} == {
        "poison_rate": 0.1,
        "target_label": 1,
        "mode": "dirty",
        "seed": 2,
    }
    assert info["splits"] == {"train": {"rows": 200, "poisoned": 20}, "test": {"rows": 50}}
    assert attack_config_from_dict(info["attack"]) == attack
    assert sorted(p.name for p in tmp_path.iterdir()) == ["poisoned"]  # no temporary folder left behind
    # Clean data: no record.
    clean = save_dataset_dict(task["test"], tmp_path / "clean")
    assert load_poison_info(clean) is None and not (clean / POISON_INFO_FILE).exists()
    (clean / POISON_INFO_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="poison_config.json is not valid JSON"):
        load_poison_info(clean)


def test_save_dataset_dict_refuses_to_overwrite_or_write_into_its_input(tmp_path, poisoned_task):
    from hf_backdoor.data import save_dataset_dict

    task, attack = poisoned_task
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="already exists and is not empty. Pass overwrite=True"):
        save_dataset_dict(task, target, attack=attack)
    assert (target / "keep.txt").read_text() == "precious"
    save_dataset_dict(task, target, attack=attack, overwrite=True)
    assert not (target / "keep.txt").exists() and (target / "dataset_dict.json").exists()

    source = tmp_path / "src"
    source.mkdir()
    for output, relation in ((source, "is"), (source / "poisoned", "is inside"), (tmp_path, "contains")):
        with pytest.raises(ValueError, match=f"{relation} the input"):
            save_dataset_dict(task, output, source_dir=source, overwrite=True)
    # Its own input even without source_dir: a dataset loaded from the folder it would be saved to.
    reloaded = datasets.load_from_disk(str(target))
    with pytest.raises(ValueError, match="inside the output folder"):
        save_dataset_dict(reloaded, target, overwrite=True)
    with pytest.raises(FileExistsError, match="is a file"):
        (tmp_path / "file").write_text("x")
        save_dataset_dict(task, tmp_path / "file", overwrite=True)


def test_an_interrupted_save_leaves_no_partial_dataset(tmp_path, poisoned_task, monkeypatch):
    from hf_backdoor.data import save_dataset_dict

    task, attack = poisoned_task
    target = tmp_path / "out"
    save_dataset_dict(task, target, attack=attack)
    before = sorted(p.name for p in target.iterdir())

    def crash(self, path, **kwargs):
        Path(path).mkdir()
        (Path(path) / "half-written.arrow").write_text("...")
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets.DatasetDict, "save_to_disk", crash)
    for output in (target, tmp_path / "new"):
        with pytest.raises(KeyboardInterrupt):
            save_dataset_dict(task, output, attack=attack, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder, no half-written "new"
    assert sorted(p.name for p in target.iterdir()) == before  # the previous dataset is untouched
