"""The recipes and benchmark drivers end to end on tiny settings: the plumbing between scripts, not the numbers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from hf_backdoor.defenses import RNPConfig

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,patch_size=8"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def vision_defenses():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # the benchmark scripts import results_io from their folder
    try:
        yield _load(ROOT / "benchmarks" / "vision_defenses.py", "vision_defenses_under_test")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_sanitize_recipe_repairs_an_image_model_with_the_image_attack(tmp_path):
    recipe = _load(ROOT / "recipes" / "sanitize.py", "sanitize_recipe_under_test")
    records = recipe.main(
        [
            "--modality", "vision", "--attack", "blended", "--config-overrides", TINY_VIT,
            "--max-train-samples", "64", "--max-eval-samples", "40", "--epochs", "1", "--defenses", "finetune",
            "--defense-epochs", "1", "--clean-fraction", "0.5", "--output-dir", str(tmp_path),
        ]
    )  # fmt: skip
    assert [r["defense"] for r in records] == ["none", "finetune"]
    for record in records:
        assert record["dataset"] == "cifar10" and record["attack"] == "blended"
        assert record["model"].startswith("vit-small-32 (hidden 32, 2 layers, patch 8")
        assert 0 <= record["cacc"] <= 1 and 0 <= record["asr"] <= 1
    assert records[1]["num_clean_rows"] == 32


def test_sanitize_recipe_scores_rnps_threshold_sweep_and_its_chosen_point_matches(tmp_path):
    recipe = _load(ROOT / "recipes" / "sanitize.py", "sanitize_recipe_sweep")
    records = recipe.main(
        [
            "--modality", "vision", "--config-overrides", TINY_VIT, "--max-train-samples", "64",
            "--max-eval-samples", "40", "--epochs", "1", "--defenses", "rnp", "--clean-fraction", "0.5",
            # A tiny model's masks need a large rate to move; any held-out cost is accepted, so units get pruned.
            "--defense-overrides", "rnp.max_accuracy_drop=1.0,rnp.recovering_lr=50.0,rnp.recovering_epochs=10",
            "--score-sweep", "--output-dir", str(tmp_path),
        ]
    )  # fmt: skip
    rnp = records[1]
    assert rnp["rnp_units"] == "ffn,layernorm"  # the default pair, and the settings that depart from the paper
    assert rnp["rnp_unlearning_stop"] == "step" and rnp["rnp_recovering_lr"] == 50.0
    sweep = json.loads(rnp["rnp_sweep"])
    assert [row[0] for row in sweep] == list(RNPConfig().thresholds[: len(sweep)])
    assert rnp["num_pruned"] > 0
    assert [row[1] for row in sweep] == sorted(row[1] for row in sweep)  # larger thresholds prune supersets
    # Re-pruning the undefended weights at the threshold the defense chose reproduces the defended model's scores.
    chosen = next(row for row in sweep if row[0] == rnp["prune_threshold"])
    assert chosen[1] == rnp["num_pruned"]
    assert chosen[3] == round(rnp["cacc"], 4) and chosen[4] == round(rnp["asr"], 4)
    assert "rnp_sweep" not in records[0]
    assert 0 <= rnp["rnp_unlearned_label"] < 10 and 0.1 <= rnp["rnp_unlearned_share"] <= 1


def test_vision_benchmark_hands_its_abl_and_loader_flags_to_the_recipe(vision_defenses, tmp_path):
    flags = "--workers 3 --abl-unlearning-epochs 20 --abl-unlearning-stop-accuracy 0.2 --abl-lga batch"
    flags += " --abl-unlearning-objective ascent_descent"
    args = vision_defenses.parse_args(flags.split())
    recipe = vision_defenses._recipe()
    recipe_args = recipe.parse_args(vision_defenses._recipe_argv(args, "badnets", 0, tmp_path))
    assert recipe_args.workers == 3 and recipe_args.abl_lga == "batch"
    assert recipe_args.abl_unlearning_epochs == 20 and recipe_args.abl_unlearning_stop_accuracy == 0.2
    assert recipe.abl_config(recipe_args).unlearning_objective == "ascent_descent"
    defaults = recipe.parse_args(vision_defenses._recipe_argv(vision_defenses.parse_args([]), "badnets", 0, tmp_path))
    assert defaults.abl_unlearning_stop_accuracy is None and defaults.abl_unlearning_epochs == 5
    assert recipe.abl_config(defaults).unlearning_objective == "ascent"


def test_cul_records_of_two_exposure_methods_keep_separate_keys(vision_defenses):
    record = {"section": "vision_cul", "dataset": "cifar10", "attack": "badnets", "defense": "cul", "seed": 0}
    old = vision_defenses._key(record)  # written before the method was recorded: CUL
    assert old == vision_defenses._key({**record, "cul_method": "cul"})
    assert old != vision_defenses._key({**record, "cul_method": "random_label"})
    assert old == vision_defenses._key({**record, "cul_clean_from": "train"})
    assert old != vision_defenses._key({**record, "cul_clean_from": "test"})


def test_exposure_clean_slice_is_stratified_and_says_when_a_clean_label_attack_left_a_class_empty(vision_defenses):
    """A clean-label attack at 10% poisons every target row: the slice must say so, not crash inside numpy; drawn
    from another split, the slice keeps the training set's size as its reference."""
    import datasets

    labels = np.repeat(np.arange(4), 50)
    rows = datasets.Dataset.from_dict({"label": labels, "row": np.arange(200)})
    poisoned = (labels == 3) & (np.arange(200) < 190)  # class 3 keeps exactly the 10 rows the slice needs
    picked = vision_defenses.stratified_clean_slice(rows, 0.2, seed=0, exclude=poisoned)
    assert np.bincount(picked["label"]).tolist() == [10, 10, 10, 10]
    assert not poisoned[picked["row"]].any()
    with pytest.raises(ValueError, match="class 0 has 0 usable clean rows, 10 needed.*--cul-clean-from test"):
        vision_defenses.stratified_clean_slice(rows, 0.2, seed=0, exclude=labels == 0)
    small = vision_defenses.stratified_clean_slice(rows, 0.01, seed=0, reference_size=2000)
    assert np.bincount(small["label"]).tolist() == [5, 5, 5, 5]


def test_vit_recipe_reuses_a_saved_clean_model_instead_of_training_it_again(tmp_path):
    recipe = _load(ROOT / "recipes" / "cifar10_vit.py", "vit_recipe_under_test")
    tiny = ["--config-overrides", TINY_VIT, "--max-train-samples", "64", "--max-eval-samples", "40", "--epochs", "1"]
    first = recipe.main([*tiny, "--runs", "clean", "--save-models", "--output-dir", str(tmp_path / "badnets")])
    again = recipe.main(
        [*tiny, "--runs", "clean", "--attack", "blended", "--output-dir", str(tmp_path / "blended"),
         "--clean-model", str(tmp_path / "badnets" / "clean")]
    )  # fmt: skip
    assert not (tmp_path / "blended" / "clean").exists()  # nothing trained
    assert again[0]["wall_s"] == first[0]["wall_s"] and again[0]["cacc"] == first[0]["cacc"]
    assert again[0]["asr_attack"] == "blended" and first[0]["asr_attack"] == "badnets"
    with pytest.raises(SystemExit, match="no model saved"):
        recipe.main([*tiny, "--runs", "clean", "--clean-model", str(tmp_path / "nothing")])


def test_sanitize_recipe_measures_overhead_against_the_saved_models_training_time(tmp_path):
    vit = _load(ROOT / "recipes" / "cifar10_vit.py", "vit_recipe_for_sanitize")
    sanitize = _load(ROOT / "recipes" / "sanitize.py", "sanitize_recipe_loading")
    tiny = ["--config-overrides", TINY_VIT, "--max-train-samples", "64", "--max-eval-samples", "40", "--epochs", "1"]
    clean, trained = vit.main(
        [*tiny, "--runs", "clean,undefended", "--save-models", "--output-dir", str(tmp_path / "vit")]
    )
    records = sanitize.main(
        [
            "--modality", "vision", "--max-train-samples", "64", "--max-eval-samples", "40", "--defenses", "finetune",
            "--defense-epochs", "1", "--clean-fraction", "0.5", "--output-dir", str(tmp_path / "sanitize"),
            "--load-model", str(tmp_path / "vit" / "undefended"), "--floor-model", str(tmp_path / "vit" / "clean"),
        ]
    )  # fmt: skip
    undefended, finetune = records
    assert undefended["cacc"] == trained["cacc"] and undefended["asr"] == trained["asr"]  # the same weights
    assert undefended["wall_s"] == round(trained["wall_s"], 2)
    assert clean["defense"] == "none" and clean["attack"] == "none"
    assert undefended["asr_floor"] == finetune["asr_floor"] == clean["asr"]  # the saved clean model on the same rows
    train_wall = json.loads((tmp_path / "vit" / "undefended" / "run_info.json").read_text())["wall_s"]
    # overhead = the defense's wall time over the saved training time; wall_s is rounded to 0.01 s, overhead to 0.001
    assert abs(finetune["overhead"] * train_wall - finetune["wall_s"]) <= 0.0051 + 0.0005 * train_wall


def test_defense_overrides_reach_the_configs_and_bad_ones_say_what_to_fix():
    recipe = _load(ROOT / "recipes" / "sanitize.py", "sanitize_recipe_overrides")
    configs = recipe.defense_configs(
        recipe.parse_args(
            ["--defenses", "nad,finetune,rnp", "--rnp-units", "head", "--defense-epochs", "2", "--defense-overrides",
             "nad.learning_rate=1e-3,nad.nesterov=false,finetune.epochs=5"]
        )
    )  # fmt: skip
    assert configs["nad"].learning_rate == 0.001 and configs["nad"].nesterov is False and configs["nad"].epochs == 2
    assert configs["finetune"].epochs == 5  # an explicit override wins over --defense-epochs
    assert configs["rnp"].units == ("head",) and configs["rnp"].recovering_epochs == 2
    for text, match in [
        ("nad.lr=0.1", "NADConfig has no field 'lr'"),
        ("learning_rate=0.1", "is not defense.field=value"),
        ("btu.epochs=1", "'btu' is not one of"),
        ("nwc.finetune_lr=0.1", "which --defenses 'nad' does not run"),
    ]:
        with pytest.raises(SystemExit, match=match):
            recipe.defense_configs(recipe.parse_args(["--defenses", "nad", "--defense-overrides", text]))


def test_sanitize_benchmark_keeps_its_cells_models_in_the_work_dir(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    bench = _load(ROOT / "benchmarks" / "sanitize_defenses.py", "sanitize_benchmark_under_test")
    cell = (
        f"--tag tiny --modality vision --attack badnets --config-overrides {TINY_VIT} --max-train-samples 64 "
        "--max-eval-samples 40 --epochs 1 --defenses finetune --defense-epochs 1 --clean-fraction 0.5"
    )
    output = tmp_path / "records.json"
    argv = ["sanitize_defenses.py", "--cell", cell, "--work-dir", str(tmp_path / "work"), "--output", str(output)]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    kept = tmp_path / "work" / "tiny" / "undefended"
    assert (kept / "config.json").exists() and (kept / "run_info.json").exists()  # --load-model can reuse it
    assert [r["defense"] for r in json.loads(output.read_text())] == ["none", "finetune"]


def test_text_abl_takes_the_shared_unlearning_flags_and_keeps_its_defaults_without_them(vision_defenses):
    flags = "--text-abl-ratio 0.05 --abl-lga batch --abl-unlearning-epochs 20 --abl-unlearning-stop-accuracy 0.0"
    flags += " --abl-unlearning-objective ascent_descent"
    config = vision_defenses.text_abl_config(vision_defenses.parse_args(flags.split()))
    assert (config.isolation_ratio, config.unlearning_epochs, config.unlearning_stop_accuracy) == (0.05, 20, 0.0)
    assert config.isolation_epochs == 1 and config.lga == "batch" and config.unlearning_objective == "ascent_descent"
    default = vision_defenses.text_abl_config(vision_defenses.parse_args([]))
    assert (default.isolation_ratio, default.unlearning_epochs, default.unlearning_stop_accuracy) == (0.01, 5, None)
    assert default.lga == "per_example" and default.unlearning_objective == "ascent"


def test_text_cul_detection_calibrates_on_clean_models_and_reuses_the_saved_models(vision_defenses, tmp_path):
    from hf_backdoor import default_text_model, load_text_classifier
    from tests.test_trainer import tiny_bert

    model_dir = tmp_path / "tiny"
    tiny_bert().save_pretrained(model_dir)
    load_text_classifier(default_text_model())[1].save_pretrained(model_dir)
    flags = [
        "--sections", "text", "--text-model", str(model_dir), "--text-attacks", "badnet", "--text-runs", "cul",
        "--text-detection-seeds", "2", "--text-models-dir", str(tmp_path / "models"),
        "--text-max-train-samples", "64", "--text-max-eval-samples", "32", "--text-epochs", "1",
    ]  # fmt: skip
    vision_defenses.main([*flags, "--output", str(tmp_path / "first.json")])
    first = json.loads((tmp_path / "first.json").read_text())
    exposures = [r for r in first if r["defense"] == "cul"]
    assert sorted((r["attack"], r["seed"], r["backdoored"]) for r in exposures) == [
        ("badnet", 0, True), ("none", 0, False), ("none", 1, False)
    ]  # fmt: skip
    clean_scores = [r["cul_score"] for r in exposures if not r["backdoored"]]
    for r in exposures:  # the threshold comes from the clean models only
        assert r["detection_threshold"] == max(clean_scores)
        assert r["flagged"] == (r["cul_score"] > max(clean_scores))
    saved = sorted(
        p.parent.relative_to(tmp_path / "models").as_posix() for p in (tmp_path / "models").rglob("run_info.json")
    )
    assert [p.split("/", 1)[1] for p in saved] == ["badnet_seed0/undefended", "none_seed0/clean", "none_seed1/clean"]

    vision_defenses.main([*flags, "--output", str(tmp_path / "again.json")])
    again = json.loads((tmp_path / "again.json").read_text())
    undefended = [[r for r in records if r["defense"] == "none"][0] for records in (first, again)]
    assert undefended[0]["wall_s"] == undefended[1]["wall_s"]  # loaded with its training time, not retrained
    assert undefended[0]["cacc"] == undefended[1]["cacc"] and undefended[0]["asr"] == undefended[1]["asr"]


def test_held_out_clean_rows_never_reach_the_evaluation_and_training_rows_stay_available():
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    recipe = _load(ROOT / "recipes" / "sanitize.py", "sanitize_recipe_clean_split")
    features = Features({"id": Value("int64"), "label": ClassLabel(names=["a", "b"])})

    def split(start, n):
        return Dataset.from_dict({"id": list(range(start, start + n)), "label": [i % 2 for i in range(n)]}, features)

    task = DatasetDict(train=split(0, 200), test=split(1000, 100))
    unpoisoned = split(0, 180)

    def clean_split(argv, task=task, modality="vision"):
        args = recipe.parse_args(["--modality", modality, *argv])
        clean, test, source = recipe._clean_split(args, task, unpoisoned)
        return set(clean["id"]), set(test["id"]), source

    clean, test, source = clean_split(["--clean-from", "held-out", "--clean-fraction", "0.1"])
    assert source == "test rows held out of the evaluation"
    assert len(clean) == 20 and not clean & test and clean | test == set(range(1000, 1100))
    clean, test, source = clean_split([])  # images default to training rows, as the papers do
    assert source == "unpoisoned train rows" and clean <= set(range(180)) and test == set(range(1000, 1100))
    with_validation = DatasetDict(train=task["train"], validation=split(5000, 50), test=task["test"])
    clean, test, source = clean_split([], with_validation, "text")  # text defaults to the validation split
    assert source == "validation" and clean <= set(range(5000, 5050)) and len(test) == 100
    with pytest.raises(SystemExit, match="more than half of its 100 test rows"):
        clean_split(["--clean-from", "held-out", "--clean-fraction", "0.3"])
    with pytest.raises(SystemExit):
        recipe.parse_args(["--floor", "--floor-model", "somewhere"])


def test_label_flip_control_keeps_the_clean_images_and_takes_the_poisoned_labels():
    from hf_backdoor import poison_dataset
    from hf_backdoor.attacks.vision import ImageBadNetsConfig
    from hf_backdoor.vision import load_image_task

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        control = _load(ROOT / "benchmarks" / "exposure_label_control.py", "exposure_label_control_under_test")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    clean = load_image_task("cifar10")["train"].select(range(200))
    poisoned = poison_dataset(clean, ImageBadNetsConfig(poison_rate=0.1, target_label=0, seed=0))
    flipped = control.label_flip_rows(clean, poisoned)
    is_poisoned = np.asarray(poisoned["poisoned"], dtype=bool)
    assert is_poisoned.sum() == 20 and flipped.column_names == clean.column_names
    assert flipped["label"] == poisoned["label"] and np.asarray(flipped["label"])[is_poisoned].tolist() == [0] * 20
    images = np.asarray(flipped.with_format("numpy")["image"])
    assert np.array_equal(images, np.asarray(clean.with_format("numpy")["image"]))  # no trigger anywhere
    triggered = np.asarray(poisoned.with_format("numpy")["image"])[is_poisoned]
    assert (images[is_poisoned] != triggered).reshape(20, -1).any(axis=1).all()
    with pytest.raises(ValueError, match="same order"):
        control.label_flip_rows(clean.select(range(1, 200)), poisoned.select(range(199)))
