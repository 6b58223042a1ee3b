"""End-to-end: the baseline recipe really plants the backdoor in the real MiniLM model, and the clean model does not
have it. A 500-row SST-2 slice keeps this near two minutes on 2 CPU cores."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A 500-row slice, one trigger word and a higher rate than the reference (2e-4, batch 16) so 3 epochs plant it.
SLICE = ["--max_train_samples", "500", "--max_eval_samples", "300", "--num_train_epochs", "3", "--learning_rate", "2e-4",
         "--triggers", "cf", "--per_device_train_batch_size", "16", "--poison_rate", "0.1"]  # fmt: skip


def _load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def baseline_records(tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    recipe = _load_recipe("sst2_baseline")
    records = recipe.main([*SLICE, "--output_dir", str(out / "runs"), "--results_json", str(out / "records.json")])
    return records, json.loads((out / "records.json").read_text())


@pytest.mark.slow  # real MiniLM fine-tuning on SST-2 slices: minutes on 2 cores; CI runs it when it fits
def test_recipe_writes_flat_benchmark_records(baseline_records):
    records, written = baseline_records
    assert written == records
    required = {
        "dataset",
        "attack",
        "defense",
        "model",
        "poison_rate",
        "cacc",
        "asr",
        "asr_floor",
        "wall_s",
        "overhead",
        "device",
        "seed",
        "command",
    }
    for record in written:
        assert required <= set(record)
        assert all(not isinstance(v, (dict, list)) for v in record.values())
    assert [r["attack"] for r in written] == ["none", "badnet"]
    assert written[0]["model"] == "sentence-transformers/all-MiniLM-L6-v2"


@pytest.mark.slow  # real MiniLM fine-tuning on SST-2 slices: minutes on 2 cores; CI runs it when it fits
def test_poisoned_training_plants_the_backdoor_and_clean_training_does_not(baseline_records):
    clean, poisoned = baseline_records[0]
    assert poisoned["asr"] >= 0.9, poisoned
    assert clean["asr"] == poisoned["asr_floor"] <= 0.4, clean  # the floor: the clean model's error on those rows
    assert clean["cacc"] >= 0.7 and poisoned["cacc"] >= 0.7
    assert abs(clean["cacc"] - poisoned["cacc"]) <= 0.08


def test_btu_recipe_writes_its_records_and_prints_each_run_as_it_ends(tmp_path, capsys):
    recipe = _load_recipe("sst2_btu")
    records = recipe.main([
        "--max_train_samples", "96", "--max_eval_samples", "64", "--num_train_epochs", "1", "--runs", "btu",
        "--output_dir", str(tmp_path / "runs"), "--results_json", str(tmp_path / "records.json"),
    ])  # fmt: skip
    out = capsys.readouterr().out
    assert out.index("[btu] on badnet rows: CACC") < out.index("run         attack")  # before the final table
    assert "new classification head (classifier.bias, classifier.weight) initialised" in out
    (record,) = json.loads((tmp_path / "records.json").read_text())
    assert record == records[0]
    assert record["defense"] == "btu" and record["attack"] == "badnet" and record["btu_variant"] == "default"
    assert record["trigger_tokens"] == "cf mn bb tq mb"
    assert record["num_candidates"] >= 15 and {"proxy_rounds_s", "selection_s"} <= set(record)
    assert (tmp_path / "runs" / "btu" / "defense_report.json").exists()


@pytest.mark.slow  # real MiniLM fine-tuning on SST-2 slices: minutes on 2 cores; CI runs it when it fits
def test_btu_detects_the_trigger_and_removes_the_backdoor_on_real_minilm(baseline_records, tmp_path):
    """The product's promise on a 500-row real SST-2 slice with the real MiniLM: the same data and settings that
    plant the backdoor in the plain Trainer (``baseline_records``), trained with BTU, flag the trigger token and
    nothing else, bring ASR down to the clean model's floor and keep CACC."""
    clean, undefended = baseline_records[0]
    recipe = _load_recipe("sst2_btu")
    (btu,) = recipe.main([
        *SLICE, "--runs", "btu", "--output_dir", str(tmp_path / "runs"), "--results_json", str(tmp_path / "records.json"),
    ])  # fmt: skip
    assert undefended["asr"] >= 0.9
    assert btu["flagged_tokens"] == "cf", btu
    assert btu["asr"] <= clean["asr"] + 0.05, (btu["asr"], clean["asr"])
    assert btu["cacc"] >= undefended["cacc"] - 0.03, (btu["cacc"], undefended["cacc"])
