"""The recipes and benchmark drivers end to end on tiny settings: the plumbing between scripts, not the numbers."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks.common import launch, records, repair, runs
from hf_backdoor.defenses import RNPConfig
from hf_backdoor.vision import VIT_PRESETS

ROOT = Path(__file__).resolve().parents[1]
TINY_VIT = "hidden_size=32,num_hidden_layers=2,num_attention_heads=2,intermediate_size=64,patch_size=8"
TINY_IMAGES = ["--config_overrides", TINY_VIT, "--max_train_samples", "64", "--max_eval_samples", "40"]
RECIPES = ["sst2_baseline", "sst2_btu", "text_stack", "sst2_sanitize", "cifar10_vit", "cifar10_sanitize"]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _recipe(name: str):
    return _load(ROOT / "recipes" / f"{name}.py", f"{name}_recipe_under_test")


@pytest.mark.parametrize("name", RECIPES)
@pytest.mark.skipif(torch.accelerator.is_available(), reason="the CPU-only default; a GPU run needs none")
def test_every_recipe_takes_bf16_on_a_cpu_only_machine(name):
    # transformers refuses bf16 without a GPU unless use_cpu is set; the recipes' usage lines suggest --bf16
    training_args = _recipe(name).parse_args(["--bf16"])[-1]
    assert training_args.bf16 is True and training_args.use_cpu is True


@pytest.mark.parametrize("name", RECIPES)
def test_every_recipe_flag_has_help_and_a_shown_default(name, capsys):
    with pytest.raises(SystemExit) as exited:
        _recipe(name).parse_args(["--help"])
    assert exited.value.code == 0
    options = capsys.readouterr().out.split("options:", 1)[1]
    # each option's help ends with its default; an option without help would show none
    entries = [e for e in options.split("\n  -") if e.strip() and not e.startswith("h, --help")]
    assert len(entries) > 100  # the recipe's own flags and every TrainingArguments field
    assert all("(default:" in " ".join(e.split()) for e in entries), [e for e in entries if "(default:" not in e][:3]


def test_accelerate_launch_trains_on_every_core_unless_told_otherwise(tmp_path):
    """accelerate's launcher sets OMP_NUM_THREADS=1 for a CPU run; the recipes' first call gives torch every core
    back, but keeps a thread count the user chose."""
    script = tmp_path / "threads.py"
    script.write_text(
        f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
        "import torch\nfrom benchmarks.common.launch import use_all_cpu_cores\n"
        "use_all_cpu_cores()\nprint('threads', torch.get_num_threads())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    launched = subprocess.run(
        ["accelerate", "launch", "--num_processes", "1", str(script)], capture_output=True, text=True, env=env
    )
    assert launched.returncode == 0, launched.stderr
    assert f"threads {len(os.sched_getaffinity(0))}" in launched.stdout
    told = subprocess.run(
        ["accelerate", "launch", "--num_processes", "1", str(script)],
        capture_output=True,
        text=True,
        env={**env, "OMP_NUM_THREADS": "1"},
    )
    assert told.returncode == 0, told.stderr
    assert "threads 1" in told.stdout


def test_a_fresh_classification_head_is_announced_in_one_line_and_other_load_reports_pass(capsys):
    launch.quiet_new_head_report()
    launch.quiet_new_head_report()  # idempotent: one filter
    logger = logging.getLogger("transformers.modeling_utils")
    assert logger.filters.count(launch._HEAD_REPORT_FILTER) == 1

    def report(*rows):
        table = "\n".join(f"{key} | {status} | " for key, status in rows)
        return logging.LogRecord("x", logging.WARNING, "", 0, f"BertForX LOAD REPORT from: m\nKey | Status |\n--+--\n{table}", None, None)  # fmt: skip

    assert not launch._HEAD_REPORT_FILTER.filter(
        report(("classifier.bias", "MISSING"), ("classifier.weight", "MISSING"))
    )
    assert (
        "BertForX: new classification head (classifier.bias, classifier.weight) initialised" in capsys.readouterr().out
    )
    assert launch._HEAD_REPORT_FILTER.filter(
        report(("classifier.bias", "MISSING"), ("bert.pooler.dense.bias", "MISSING"))
    )
    assert launch._HEAD_REPORT_FILTER.filter(report(("classifier.weight", "MISMATCH")))
    from hf_backdoor import load_text_classifier

    load_text_classifier()  # the real report of the packaged MiniLM
    assert "new classification head (classifier.bias, classifier.weight) initialised" in capsys.readouterr().out


def test_sanitize_recipe_repairs_an_image_model_with_the_image_attack(tmp_path):
    records_ = _recipe("cifar10_sanitize").main(
        [*TINY_IMAGES, "--attack", "blended", "--num_train_epochs", "1", "--defenses", "finetune",
         "--defense_epochs", "1", "--clean_fraction", "0.5", "--crop_padding", "0", "--output_dir", str(tmp_path)]
    )  # fmt: skip
    assert [r["defense"] for r in records_] == ["none", "finetune"]
    assert records_[1]["fit_augmentation"] == "horizontal flip"  # the repair trains through the model's own crop
    for record in records_:
        assert record["dataset"] == "cifar10" and record["attack"] == "blended" and record["modality"] == "vision"
        assert record["model"].startswith("vit-small-32 (hidden 32, 2 layers, patch 8")
        assert 0 <= record["cacc"] <= 1 and 0 <= record["asr"] <= 1
    assert records_[1]["num_clean_rows"] == 32
    assert (tmp_path / "undefended" / "run_info.json").exists()  # --load_model can repair it again


def test_sanitize_recipe_scores_rnps_threshold_sweep_and_its_chosen_point_matches(tmp_path):
    records_ = _recipe("cifar10_sanitize").main(
        [*TINY_IMAGES, "--num_train_epochs", "1", "--defenses", "rnp", "--clean_fraction", "0.5",
         # A tiny model's masks need a large rate to move; any held-out cost is accepted, so units get pruned.
         "--defense_overrides", "rnp.max_accuracy_drop=1.0,rnp.recovering_lr=50.0,rnp.recovering_epochs=10",
         "--score_sweep", "--output_dir", str(tmp_path)]
    )  # fmt: skip
    rnp = records_[1]
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
    assert "rnp_sweep" not in records_[0]
    assert 0 <= rnp["rnp_unlearned_label"] < 10 and 0.1 <= rnp["rnp_unlearned_share"] <= 1


def test_vision_benchmark_hands_its_abl_and_loader_flags_to_the_recipe(tmp_path):
    from benchmarks import vision_defenses

    flags = "--workers 3 --abl-unlearning-epochs 20 --abl-unlearning-stop-accuracy 0.2 --abl-lga batch"
    flags += " --abl-unlearning-objective ascent_descent --config-overrides cpu --batch-size 64"
    recipe = vision_defenses.load_recipe()
    args = vision_defenses.parse_args(flags.split())
    script, training_args = recipe.parse_args(vision_defenses.recipe_argv(args, "badnet", 0, tmp_path))
    assert training_args.dataloader_num_workers == 3 and script.save_models and training_args.seed == 0
    assert training_args.per_device_train_batch_size == 64 and script.config_overrides == "cpu"
    args.models_dir = str(tmp_path)
    assert vision_defenses.models_dir(args, "badnet", 0).parent.name.endswith("_b64_cpu")
    config = runs.recipe_defense(training_args, recipe.ABL_DEFAULTS)
    assert config.lga == "batch" and config.isolation_epochs == 10
    assert config.unlearning_epochs == 20 and config.unlearning_stop_accuracy == 0.2
    assert config.unlearning_objective == "ascent_descent"
    argv = vision_defenses.recipe_argv(vision_defenses.parse_args([]), "badnet", 3, tmp_path)
    default = runs.recipe_defense(recipe.parse_args(argv)[1], recipe.ABL_DEFAULTS)
    assert default.unlearning_stop_accuracy is None and default.unlearning_epochs == 5
    assert default.unlearning_objective == "ascent" and default.seed == 3  # the training seed seeds ABL


def test_vision_benchmark_hands_an_attacks_settings_and_saved_models_over(tmp_path):
    from benchmarks import vision_defenses

    recipe = vision_defenses.load_recipe()
    args = vision_defenses.parse_args(["--attack-kwargs", '{"wanet": {"s": 1.0, "cross_ratio": 0}}'])
    script, _ = recipe.parse_args(vision_defenses.recipe_argv(args, "wanet", 0, tmp_path))
    wanet = script.attack_config(0)
    assert (wanet.name, wanet.s, wanet.cross_ratio, wanet.seed) == ("wanet", 1.0, 0, 0)
    assert script.attack_kwargs_text == '{"cross_ratio": 0, "s": 1.0}'  # what the records carry
    script, _ = recipe.parse_args(vision_defenses.recipe_argv(args, "badnet", 0, tmp_path))
    assert script.attack_kwargs is None and script.attack_config(0).name == "badnet"  # only the attack named
    script, _ = recipe.parse_args(["--attack", "badnet", "--attack_kwargs", '{"s": 1.0}'])
    with pytest.raises(SystemExit, match="does not fit the badnet attack"):
        script.attack_config(0)
    models = vision_defenses.saved_model_list(f"none:0={tmp_path}/a, badnet:1={tmp_path}/b")
    assert models == [("none", 0, tmp_path / "a"), ("badnet", 1, tmp_path / "b")]
    for bad in (f"badnet:1={tmp_path}", f"none:0={tmp_path}", "none=x,badnet:0=y"):
        with pytest.raises(SystemExit, match="--cul-models"):
            vision_defenses.saved_model_list(bad)


def test_recipe_defense_takes_the_recipe_defaults_under_defense_kwargs_and_the_training_seed():
    recipe = _recipe("cifar10_vit")
    _, training_args = recipe.parse_args(["--seed", "4", "--defense_kwargs", '{"isolation_ratio": 0.05}'])
    config = runs.recipe_defense(training_args, recipe.ABL_DEFAULTS)
    assert (config.isolation_ratio, config.isolation_epochs, config.seed) == (0.05, 5, 4)
    # the recipe's ABL is the setting measured on the ViT, not ABLConfig's text defaults
    assert (config.lga, config.unlearning_objective, config.unlearning_stop_accuracy) == ("batch", "complementary", 0.0)
    _, training_args = recipe.parse_args(["--defense_kwargs", '{"abl": {"isolation_epochs": 2, "seed": 9}}'])
    config = runs.recipe_defense(training_args, recipe.ABL_DEFAULTS)
    assert (config.isolation_epochs, config.seed) == (2, 9)
    _, training_args = recipe.parse_args(["--defense", "abl", "btu"])
    with pytest.raises(SystemExit, match="exactly one defense"):
        runs.recipe_defense(training_args)


def test_cul_records_of_two_exposure_methods_keep_separate_keys():
    record = {"section": "vision_cul", "dataset": "cifar10", "attack": "badnets", "defense": "cul", "seed": 0}
    old = records.defenses_record_key(record)  # written before the method was recorded: CUL
    assert old == records.defenses_record_key({**record, "cul_method": "cul"})
    assert old != records.defenses_record_key({**record, "cul_method": "random_label"})
    assert old == records.defenses_record_key({**record, "cul_clean_from": "train"})
    assert old != records.defenses_record_key({**record, "cul_clean_from": "test"})


def test_a_floor_comes_from_a_clean_model_measured_on_the_same_device_where_one_exists():
    def clean(device, asr):
        return dict(
            dataset="sst2",
            attack="none",
            defense="none",
            asr_attack="badnet",
            model="m",
            seed=0,
            asr=asr,
            device=device,
            command=f"run on {device}",
        )

    known = [("a.json", clean("cpu: AVX2", 0.10)), ("b.json", clean("cpu: AVX-512", 0.12))]
    record = dict(dataset="sst2", asr_attack="badnet", model="m", seed=0, device="cpu: AVX-512")
    records.fill_floors([record], known)
    assert record["asr_floor"] == 0.12 and "another device" not in record["asr_floor_source"]

    elsewhere = dict(dataset="sst2", asr_attack="badnet", model="m", seed=0, device="NVIDIA H200")
    records.fill_floors([elsewhere], known)
    assert elsewhere["asr_floor"] == 0.10
    assert elsewhere["asr_floor_source"].endswith("measured on another device (cpu: AVX2)")


def test_a_floor_comes_from_a_clean_model_trained_with_the_same_crop_and_from_an_earlier_record_on_the_same_rows(
    tmp_path,
):
    """A crop-0 ViT's clean control (backdoor_location's records) once stood as a floor for a crop-4 model of the same
    name and seed; and a cell that loads a saved model without --floor-model takes its earlier floor on the same rows."""
    from benchmarks.sanitize_defenses import _fill_floors_from_output

    crop0 = dict(dataset="cifar10", attack="none", defense="none", asr_attack="badnet", model="vit", seed=0)
    known = [("loc.json", {**crop0, "asr": 0.041, "crop_padding": 0, "device": "cpu", "command": "crop 0"})]
    crop4 = dict(dataset="cifar10", asr_attack="badnet", model="vit", seed=0, device="cpu")
    records.fill_floors([crop4], known)
    assert crop4.get("asr_floor") is None
    crop0_model = {**crop4, "crop_padding": 0}
    records.fill_floors([crop0_model], known)
    assert crop0_model["asr_floor"] == 0.041  # its own control still serves it
    same = dict(dataset="cifar10", attack="badnet", model="vit", model_epochs=45.0, seed=0, clean_source="held-out")
    earlier = {**same, "defense": "none", "num_clean_rows": 500, "asr_floor": 0.048, "command": "cell"}
    output = tmp_path / "sanitize.json"
    output.write_text(json.dumps([earlier]))
    loaded = [{**same, "defense": "rnp", "num_clean_rows": 500}, {**same, "defense": "rnp", "num_clean_rows": 1000}]
    _fill_floors_from_output(loaded, output)
    assert loaded[0]["asr_floor"] == 0.048 and "`cell` on the same rows" in loaded[0]["asr_floor_source"]
    assert loaded[1].get("asr_floor") is None  # 1,000 clean rows held out: other evaluation rows


def test_paraphrase_records_of_other_training_sizes_or_rates_are_kept_apart(tmp_path):
    """A full-split run once replaced the 2,000-row slice's record of the same attack: the key holds both now."""
    from benchmarks.paraphrase_defenses import _merge

    record = {"dataset": "sst2", "attack": "style", "asr_attack": "style", "defense": "none", "tag": "plain"}
    record |= {"poison_rate": 0.2, "epochs": 3.0, "learning_rate": 1e-4, "num_train": 2000, "seed": 0, "asr": 0.4}
    output = tmp_path / "records.json"
    _merge(output, [record])
    _merge(output, [{**record, "num_train": 6920, "asr": 0.46}, {**record, "learning_rate": 3e-4, "asr": 0.9}])
    assert sorted(r["asr"] for r in json.loads(output.read_text())) == [0.4, 0.46, 0.9]
    _merge(output, [{**record, "asr": 0.41}])  # the same run again replaces its record
    assert sorted(r["asr"] for r in json.loads(output.read_text())) == [0.41, 0.46, 0.9]


def test_paraphrase_benchmark_keeps_a_clean_label_attack_apart_from_the_dirty_one(tmp_path):
    """``--attack-kwargs '{"mode": "clean-label"}'``: the attack is built with it, its plain model is cached and its
    records kept under their own key, and a field the attack does not have is an error naming it."""
    import argparse

    from benchmarks.paraphrase_defenses import _attack, _attack_kwargs, _cache_key, _key, _merge, parse_args

    dirty_args = parse_args(["--dataset", "sst2", "--attack", "badnet"])
    clean_label_args = parse_args(
        ["--dataset", "sst2", "--attack", "badnet", "--attack-kwargs", '{"mode": "clean-label"}']
    )
    assert _attack("badnet", "sst2", 0.1, 0).mode == "dirty"
    attack = _attack("badnet", "sst2", 0.1, 0, {"mode": "clean-label"})
    assert attack.mode == "clean-label" and attack.poison_rate == 0.1
    rows = {"text": ["a b", "c d"], "label": [0, 1]}
    assert _cache_key(dirty_args, "m", attack, rows) != _cache_key(clean_label_args, "m", attack, rows)
    assert _cache_key(dirty_args, "m", None, rows) == _cache_key(clean_label_args, "m", None, rows)  # one clean model
    record = {"dataset": "sst2", "attack": "badnet", "asr_attack": "badnet", "defense": "none", "tag": "plain"}
    record |= {"poison_rate": 0.1, "epochs": 3.0, "seed": 0, "asr": 1.0}
    clean_label = {**record, "attack_kwargs": '{"mode": "clean-label"}', "asr": 0.3}
    assert _key(record) != _key(clean_label)
    _merge(tmp_path / "records.json", [record, clean_label])
    assert sorted(r["asr"] for r in json.loads((tmp_path / "records.json").read_text())) == [0.3, 1.0]
    with pytest.raises(SystemExit, match="--attack-kwargs.*colour"):
        _attack("badnet", "sst2", 0.1, 0, {"colour": "red"})
    with pytest.raises(SystemExit, match="must be a JSON object"):
        _attack_kwargs(argparse.Namespace(attack_kwargs='["mode"]'))


def test_paraphrase_benchmark_scores_a_defense_on_clean_data_against_the_plain_clean_run(tmp_path):
    """``clean+btu+dpoe``: the stack on unpoisoned rows, scored on every attack's rows, its wall time over the plain
    clean run's from the same invocation."""
    from benchmarks.paraphrase_defenses import main

    argv = ["--dataset", "sst2", "--attack", "badnet,addsent", "--runs", "clean,clean+btu+dpoe", "--epochs", "1"]
    argv += ["--max-train-samples", "64", "--max-eval-samples", "48", "--threads", "1", "--retrain-plain"]
    records = main([*argv, "--cache-dir", str(tmp_path / "cache"), "--output-dir", str(tmp_path), "--no-save"])
    plain = {r["asr_attack"]: r for r in records if r["defense"] == "none"}
    stacked = {r["asr_attack"]: r for r in records if r["defense"] == "btu+dpoe"}
    assert set(plain) == set(stacked) == {"badnet", "addsent"}
    for attack, record in stacked.items():
        assert record["attack"] == "none" and record["poison_rate"] == 0.0 and record["num_test"] == 48
        assert record["asr_floor"] == plain[attack]["asr"]
        assert record["overhead"] == pytest.approx(record["wall_s"] / plain[attack]["wall_s"], rel=0.05)
        assert record["signal"] == "expert_confidence" and record["signal_auroc"] is None  # no poisoned rows
        # evaluate_backdoor matched the ASR rows to their clean rows by the row ids the benchmark gave the test rows.
        assert 0.0 <= record["asr_untriggered"] <= 1.0 and 0.0 <= plain[attack]["asr_untriggered"] <= 1.0
    with pytest.raises(SystemExit, match="--runs must list"):
        main([*argv[:4], "--runs", "clean+undefended"])


def test_every_stored_record_keeps_the_common_fields():
    """The records in benchmarks/results/ stay readable by the scripts that merge into them and give floors."""
    common = {"dataset", "attack", "defense", "model", "poison_rate", "cacc", "asr", "asr_floor", "wall_s"}
    common |= {"overhead", "device", "seed", "command"}
    stored = records.known_records()
    assert len(stored) > 100
    for source, record in stored:
        assert common <= set(record), (source, sorted(common - set(record)))


def test_exposure_clean_slice_is_stratified_and_says_when_a_clean_label_attack_left_a_class_empty():
    """A clean-label attack at 10% poisons every target row: the slice must say so, not crash inside numpy; drawn
    from another split, the slice keeps the training set's size as its reference."""
    import datasets

    labels = np.repeat(np.arange(4), 50)
    rows = datasets.Dataset.from_dict({"label": labels, "row": np.arange(200)})
    poisoned = (labels == 3) & (np.arange(200) < 190)  # class 3 keeps exactly the 10 rows the slice needs
    picked = runs.stratified_clean_slice(rows, 0.2, seed=0, exclude=poisoned)
    assert np.bincount(picked["label"]).tolist() == [10, 10, 10, 10]
    assert not poisoned[picked["row"]].any()
    with pytest.raises(ValueError, match="class 0 has 0 usable clean rows, 10 needed.*--cul-clean-from test"):
        runs.stratified_clean_slice(rows, 0.2, seed=0, exclude=labels == 0)
    small = runs.stratified_clean_slice(rows, 0.01, seed=0, reference_size=2000)
    assert np.bincount(small["label"]).tolist() == [5, 5, 5, 5]


def test_vit_recipe_reuses_a_saved_clean_model_instead_of_training_it_again(tmp_path, capsys):
    recipe = _recipe("cifar10_vit")
    tiny = [*TINY_IMAGES, "--num_train_epochs", "1"]
    first = recipe.main([*tiny, "--runs", "clean", "--save_models", "--output_dir", str(tmp_path / "badnet")])
    assert "[clean] CACC" in capsys.readouterr().out  # the run's line, as soon as it ends
    again = recipe.main(
        [*tiny, "--runs", "clean", "--attack", "blended", "--output_dir", str(tmp_path / "blended"),
         "--clean_model", str(tmp_path / "badnet" / "clean")]
    )  # fmt: skip
    assert not (tmp_path / "blended" / "clean").exists()  # nothing trained
    assert again[0]["wall_s"] == first[0]["wall_s"] and again[0]["cacc"] == first[0]["cacc"]
    assert again[0]["asr_attack"] == "blended" and first[0]["asr_attack"] == "badnet"
    with pytest.raises(SystemExit, match="no model saved"):
        recipe.main([*tiny, "--runs", "clean", "--clean_model", str(tmp_path / "nothing")])


def test_sanitize_recipe_measures_overhead_against_the_saved_models_training_time(tmp_path):
    tiny = [*TINY_IMAGES, "--num_train_epochs", "1"]
    clean, trained = _recipe("cifar10_vit").main(
        [*tiny, "--runs", "clean,undefended", "--save_models", "--output_dir", str(tmp_path / "vit")]
    )
    records_ = _recipe("cifar10_sanitize").main(
        ["--max_train_samples", "64", "--max_eval_samples", "40", "--defenses", "finetune", "--defense_epochs", "1",
         "--clean_fraction", "0.5", "--output_dir", str(tmp_path / "sanitize"),
         "--load_model", str(tmp_path / "vit" / "undefended"), "--floor_model", str(tmp_path / "vit" / "clean")]
    )  # fmt: skip
    undefended, finetune = records_
    assert undefended["cacc"] == trained["cacc"] and undefended["asr"] == trained["asr"]  # the same weights
    assert undefended["wall_s"] == round(trained["wall_s"], 2)
    assert undefended["model"] == trained["model"]  # the saved ViT named by its own shape
    assert clean["defense"] == "none" and clean["attack"] == "none"
    assert undefended["asr_floor"] == finetune["asr_floor"] == clean["asr"]  # the saved clean model on the same rows
    train_wall = json.loads((tmp_path / "vit" / "undefended" / "run_info.json").read_text())["wall_s"]
    # overhead = the defense's wall time over the saved training time; wall_s is rounded to 0.01 s, overhead to 0.001
    assert abs(finetune["overhead"] * train_wall - finetune["wall_s"]) <= 0.0051 + 0.0005 * train_wall


def test_defense_overrides_reach_the_configs_and_bad_ones_say_what_to_fix():
    def configs(**fields):
        return repair.repair_configs(repair.RepairArguments(**fields), seed=0)

    chosen = configs(defenses="nad,finetune,rnp", rnp_units="head", defense_epochs=2,
                     defense_overrides="nad.learning_rate=1e-3,nad.nesterov=false,finetune.epochs=5")  # fmt: skip
    assert chosen["nad"].learning_rate == 0.001 and chosen["nad"].nesterov is False and chosen["nad"].epochs == 2
    assert chosen["finetune"].epochs == 5  # an explicit override wins over --defense_epochs
    assert chosen["rnp"].units == ("head",) and chosen["rnp"].recovering_epochs == 2
    for text, match in [
        ("nad.lr=0.1", "NADConfig has no field 'lr'"),
        ("learning_rate=0.1", "is not defense.field=value"),
        ("btu.epochs=1", "'btu' is not one of"),
        ("nwc.finetune_lr=0.1", "which --defenses 'nad' does not run"),
    ]:
        with pytest.raises(SystemExit, match=match):
            configs(defenses="nad", defense_overrides=text)
    with pytest.raises(SystemExit, match="--defenses must list some of"):
        configs(defenses="btu")


def test_sanitize_benchmark_keeps_its_cells_models_in_the_work_dir(tmp_path, monkeypatch):
    from benchmarks import sanitize_defenses

    cell = (
        f"--tag tiny --modality vision --attack badnet --config_overrides {TINY_VIT} --max_train_samples 64 "
        "--max_eval_samples 40 --num_train_epochs 1 --defenses finetune --defense_epochs 1 --clean_fraction 0.5"
    )
    output = tmp_path / "records.json"
    argv = ["sanitize_defenses.py", "--cell", cell, "--work-dir", str(tmp_path / "work"), "--output", str(output)]
    monkeypatch.setattr(sys, "argv", argv)
    sanitize_defenses.main()
    kept = tmp_path / "work" / "tiny" / "undefended"
    assert (kept / "config.json").exists() and (kept / "run_info.json").exists()  # --load_model can reuse it
    written = json.loads(output.read_text())
    assert [r["defense"] for r in written] == ["none", "finetune"]
    assert written[0]["command"].startswith("python benchmarks/sanitize_defenses.py --cell '--modality vision ")
    assert [r["model_epochs"] for r in written] == [1, 1]

    # the kept model, repaired again: its records name the epochs it was trained for, read from its run_info.json
    reload = f"--tag again --modality vision --attack badnet --config_overrides {TINY_VIT} --max_train_samples 64 "
    reload += f"--max_eval_samples 40 --load_model {kept} --defenses finetune --defense_epochs 1 --clean_fraction 0.5"
    monkeypatch.setattr(sys, "argv", ["sanitize_defenses.py", "--cell", reload, "--output", str(output)])
    sanitize_defenses.main()
    assert [r["model_epochs"] for r in json.loads(output.read_text())] == [1, 1]


def test_sanitize_records_of_other_epochs_or_clean_slices_are_other_results():
    from benchmarks.sanitize_defenses import _key

    record = {"dataset": "cifar10", "attack": "badnet", "defense": "rnp", "poison_rate": 0.1, "model": "vit", "seed": 0}
    assert _key({**record, "model_epochs": 30.0}) != _key({**record, "model_epochs": 45.0})
    assert _key({**record, "model_epochs": 45.0}) == _key({**record, "model_epochs": 45.0})
    assert _key({**record, "num_clean_rows": 500}) != _key({**record, "num_clean_rows": 1000})  # another clean slice


def test_text_abl_takes_the_unlearning_flags_and_keeps_its_defaults_without_them():
    from benchmarks import text_defenses

    flags = "--abl-ratio 0.05 --abl-lga batch --abl-unlearning-epochs 20 --abl-unlearning-stop-accuracy 0.0"
    flags += " --abl-unlearning-objective ascent_descent"
    config = text_defenses.text_abl_config(text_defenses.parse_args(flags.split()))
    assert (config.isolation_ratio, config.unlearning_epochs, config.unlearning_stop_accuracy) == (0.05, 20, 0.0)
    assert config.isolation_epochs == 1 and config.lga == "batch" and config.unlearning_objective == "ascent_descent"
    default = text_defenses.text_abl_config(text_defenses.parse_args([]))
    assert (default.isolation_ratio, default.unlearning_epochs, default.unlearning_stop_accuracy) == (0.01, 5, None)
    assert default.lga == "per_example" and default.unlearning_objective == "ascent"


def test_text_cul_detection_calibrates_on_clean_models_and_reuses_the_saved_models(tmp_path):
    from benchmarks import text_defenses
    from hf_backdoor import default_text_model, load_text_classifier
    from tests.conftest import tiny_bert

    model_dir = tmp_path / "tiny"
    tiny_bert().save_pretrained(model_dir)
    load_text_classifier(default_text_model())[1].save_pretrained(model_dir)
    flags = [
        "--model", str(model_dir), "--attacks", "badnet", "--runs", "cul", "--detection-seeds", "2",
        "--models-dir", str(tmp_path / "models"), "--max-train-samples", "64", "--max-eval-samples", "32",
        "--epochs", "1",
    ]  # fmt: skip
    text_defenses.main([*flags, "--output", str(tmp_path / "first.json")])
    first = json.loads((tmp_path / "first.json").read_text())
    assert {r["section"] for r in first} == {"text"}
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

    text_defenses.main([*flags, "--output", str(tmp_path / "again.json")])
    again = json.loads((tmp_path / "again.json").read_text())
    undefended = [[r for r in found if r["defense"] == "none"][0] for found in (first, again)]
    assert undefended[0]["wall_s"] == undefended[1]["wall_s"]  # loaded with its training time, not retrained
    assert undefended[0]["cacc"] == undefended[1]["cacc"] and undefended[0]["asr"] == undefended[1]["asr"]


def test_held_out_clean_rows_never_reach_the_evaluation_and_training_rows_stay_available():
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    features = Features({"id": Value("int64"), "label": ClassLabel(names=["a", "b"])})

    def split(start, n):
        return Dataset.from_dict({"id": list(range(start, start + n)), "label": [i % 2 for i in range(n)]}, features)

    task = DatasetDict(train=split(0, 200), test=split(1000, 100))
    poisoned = task["train"].add_column("poisoned", [int(i >= 180) for i in range(200)])

    def clean_split(task=task, text=False, **fields):
        clean, test, source = repair.clean_split(repair.RepairArguments(**fields), task, poisoned, 0, text=text)
        return set(clean["id"]), set(test["id"]), source

    clean, test, source = clean_split(clean_from="held-out", clean_fraction=0.1)
    assert source == "test rows held out of the evaluation"
    assert len(clean) == 20 and not clean & test and clean | test == set(range(1000, 1100))
    clean, test, source = clean_split()  # images default to training rows, as the papers do
    assert source == "unpoisoned train rows" and clean <= set(range(180)) and test == set(range(1000, 1100))
    with_validation = DatasetDict(train=task["train"], validation=split(5000, 50), test=task["test"])
    clean, test, source = clean_split(with_validation, text=True)  # text defaults to the validation split
    assert source == "validation" and clean <= set(range(5000, 5050)) and len(test) == 100
    with pytest.raises(SystemExit, match="more than half of its 100 test rows"):
        clean_split(clean_from="held-out", clean_fraction=0.3)
    with pytest.raises(SystemExit, match="give one of them"):
        repair.RepairArguments(floor=True, floor_model="somewhere")


def test_label_flip_control_keeps_the_clean_images_and_takes_the_poisoned_labels():
    from benchmarks import exposure_label_control as control
    from hf_backdoor import poison_dataset
    from hf_backdoor.attacks.vision import ImageBadNetsConfig
    from hf_backdoor.vision import load_image_task

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


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Recipes may raise torch's thread count (launch.use_all_cpu_cores); other tests keep theirs."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_stack_recipe_runs_clean_undefended_and_the_stack_and_records_each_defense(tmp_path, capsys):
    results = tmp_path / "stack.json"
    argv = ["--attack", "badnet", "--poison_rate", "0.2", "--max_train_samples", "96", "--max_eval_samples", "64"]
    argv += ["--num_train_epochs", "1", "--output_dir", str(tmp_path / "runs"), "--results_json", str(results)]
    out = _recipe("text_stack").main(argv)
    assert [r["run"] for r in out] == ["clean", "undefended", "defended"]
    defended = out[-1]
    assert defended["defense"] == "btu+z_defense" == defended["defense_stack"]
    assert 0.0 <= defended["z_defense/flagged_fraction"] < 1.0
    assert any(key.startswith("btu/") for key in defended)
    assert defended["asr_floor"] == out[0]["asr"] and defended["overhead"] > 0
    assert json.loads(results.read_text())[-1]["defense"] == "btu+z_defense"
    printed = capsys.readouterr().out
    assert "z_defense:" in printed and "stack btu+z_defense" in printed


def test_vit_config_benchmark_keeps_its_models_in_the_zoo_and_gives_attacked_runs_the_clean_floor(
    tmp_path, monkeypatch
):
    monkeypatch.setenv("HF_BACKDOOR_CACHE", str(tmp_path / "zoo"))
    bench = _load(ROOT / "benchmarks" / "vit_configs.py", "vit_configs_under_test")
    output = tmp_path / "vit_configs.json"
    tiny = ["--configs", TINY_VIT, "--data", "cifar10", "--epochs", "1", "--batch-size", "32", "--eval-every", "0.5"]
    tiny += ["--max-train-samples", "64", "--max-eval-samples", "40", "--output", str(output)]
    tiny += ["--output-dir", str(tmp_path / "runs")]
    clean = bench.main(tiny)[0]
    again = bench.main(tiny)[0]
    attacked = bench.main([*tiny, "--attack", "badnet"])[0]
    assert clean["from_cache"] is False and again["from_cache"] is True  # trained once, then read from the zoo
    assert again["cacc"] == clean["cacc"] and again["wall_s"] == clean["wall_s"]
    assert set(clean["cacc_curve"]) == {"0.5", "1.0"}  # two steps of 32 rows, measured after each
    assert clean["asr_attack"] == "badnet" and clean["asr_floor"] == clean["asr"]
    assert attacked["attack"] == "badnet" and attacked["asr_floor"] == clean["asr"]
    assert attacked["zoo_key"] != clean["zoo_key"]
    stored = json.loads(output.read_text())
    assert [r["attack"] for r in stored] == ["none", "badnet"]  # the second clean run replaced the first
    bf16 = bench.main([*tiny, "--bf16"])[0]  # another training: its own zoo entry and record, fp32's kept
    assert bf16["bf16"] is True and bf16["from_cache"] is False and bf16["zoo_key"] != clean["zoo_key"]
    assert [(r["attack"], r["bf16"]) for r in json.loads(output.read_text())] == [
        ("none", False),
        ("badnet", False),
        ("none", True),
    ]
    spelled_out = ",".join(f"{k}={v}" for k, v in {**VIT_PRESETS["cpu"], "num_hidden_layers": 1}.items())
    preset = bench.main(["--configs", "cpu,num_hidden_layers=1", *tiny[2:], "--epochs", "0.5"])[0]
    again = bench.main(["--configs", spelled_out, *tiny[2:], "--epochs", "0.5", "--attack", "badnet"])[0]
    assert preset["model_config"]["hidden_size"] == 128 and again["asr_floor"] == preset["asr"]  # one architecture


def test_vit_config_benchmark_compiles_only_when_asked_and_keys_the_zoo_by_it(tmp_path, monkeypatch):
    from hf_backdoor.zoo import config_key

    bench = _load(ROOT / "benchmarks" / "vit_configs.py", "vit_configs_compile_under_test")
    seen = []  # per run: the zoo config, then the TrainingArguments its training would have used

    class Stop(Exception):
        pass

    def capture_training_args(training_args, *args, **kwargs):
        seen.append(training_args)
        raise Stop

    def train_or_load(config, train_fn, **kwargs):
        seen.append(config)
        train_fn(config)  # stops in train_vit, before any step

    monkeypatch.setattr(bench, "train_or_load", train_or_load)
    monkeypatch.setattr(bench, "train_vit", capture_training_args)
    tiny = ["--configs", TINY_VIT, "--data", "cifar10", "--epochs", "1", "--max-train-samples", "32"]
    tiny += ["--max-eval-samples", "8", "--output", str(tmp_path / "out.json"), "--output-dir", str(tmp_path / "runs")]
    for flags in ([], ["--compile"]):
        with pytest.raises(Stop):
            bench.main([*tiny, *flags])
    plain_config, plain_args, compiled_config, compiled_args = seen
    assert plain_args.torch_compile is False and "torch_compile" not in plain_config.training  # old keys unchanged
    assert compiled_args.torch_compile is True and compiled_config.training["torch_compile"] is True
    assert config_key(compiled_config) != config_key(plain_config)
    record = {"data": "x", "model_config": {}, "epochs": 1, "batch_size": 8, "learning_rate": 1e-3, "seed": 0}
    assert bench._same_run(record, {**record, "torch_compile": False})
    assert not bench._same_run(record, {**record, "torch_compile": True})  # a compiled run is its own record
