"""The ``hf-backdoor`` command line: help, argument errors and exit codes, the checks that run before anything
loads, and runs on real SST-2 rows (a tiny random BERT with MiniLM's tokenizer for speed; MiniLM itself once)."""

import argparse
import json
import re
import stat
import time

import datasets
import pytest
from huggingface_hub import ModelCard

from hf_backdoor.cli import build_parser, main
from hf_backdoor.cli.options import HelpFormatter
from hf_backdoor.registry import DEFENSES
from tests.conftest import tiny_bert

COMMANDS = ["poison", "train", "scan", "evaluate", "sanitize", "report"]
SLICES = ["--max-train-samples", "192", "--max-eval-samples", "48"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: hf-backdoor " + command in capsys.readouterr().out


def test_every_option_has_help_and_shows_its_default():
    parser = build_parser()
    for name, command in parser.commands.items():
        formatter = HelpFormatter(prog=name)
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help and action.help.strip(), f"{name} {action.option_strings} has no help"
            shown = formatter._get_help_string(action)
            assert "default" in shown or "(required)" in shown, f"{name} {action.option_strings}: {shown}"
    # The ASR rows of `evaluate` poison no training split: no poisoning flags there.
    evaluate = parser.commands["evaluate"].format_help()
    assert not re.search(r"--(poison-rate|mode)\b", evaluate)
    # Each training defense's config fields are listed with their help under `train --help`.
    train = parser.commands["train"].format_help()
    for name, entry in DEFENSES.items():
        if getattr(entry.method_class, "stage", None) == "training":
            assert f"\n  {name}" in train


def test_the_default_defense_is_the_librarys_choice(monkeypatch):
    import hf_backdoor.defenses

    monkeypatch.setattr(hf_backdoor.defenses, "DEFAULT_DEFENSES", {"training": "abl", "repair": "nad"}, raising=False)
    parser = build_parser()
    assert parser.commands["train"].get_default("defense") == ["abl"]
    assert parser.commands["sanitize"].get_default("defense") == ["nad"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["poison", "--dataset", "sst3", "--output", "x"], "Packaged tasks (offline): sst2, imdb, hsol"),
        (["poison", "--poison-rate", "1.5", "--output", "x"], "poison_rate must be in"),
        (["poison"], "Say where the poisoned dataset goes"),
        (["train", "--max-train-samples", "0"], "--max-train-samples must be a positive integer"),
        (["train", "--defense", "btu", "--defense-kwargs", "{flip"], "--defense-kwargs is not valid JSON"),
        (["train", "--defense", "btu", "--defense-kwargs", '{"flip_treshold": 0.7}'], "Did you mean 'flip_threshold'"),
        (["train", "--defense", "btu", "--defense-kwargs", '{"flip_threshold": 7}'], "flip_threshold must be in"),
        (["train", "--defense", "btu,abl", "--defense-kwargs", '{"nad": {}}'], "not among the defenses"),
        (["train", "--defense", "none", "--defense-kwargs", '{"top_k": 3}'], "--defense-kwargs needs --defense"),
        (["train", "--defense", "bttu"], "no such defense"),
        (["train", "--defense", "rnp"], "run it on the trained model with `hf-backdoor sanitize"),
        (["train", "--dataset", "./missing_path"], "--dataset ./missing_path: no such local file or folder"),
        (["train", "--push-to-hub"], "--push-to-hub needs --hub-model-id"),
        (["train", "--push-to-hub", "--hub-model-id", "me/run"], "`hf upload me/run runs/hf-backdoor-train`"),
        (["train", "--model", "no/such/folder"], "--model no/such/folder does not exist"),
        (["evaluate", "--model", "no/such/folder"], "does not exist"),
        (["report", "--run-dir", "."], "holds no saved model"),
        (["sanitize", "--model", ".", "--defense", "prune"], "no such defense"),
        (["sanitize", "--model", ".", "--defense", "btu"], "run it while training with `hf-backdoor train"),
        (["scan", "--defense", "none"], "name one with --defense"),
        (["train", "--import-module", "no_such_plugin"], "--import-module no_such_plugin: cannot import it"),
    ],
)
def test_errors_exit_1_with_what_to_fix(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("hf-backdoor ") and ": error: " in err and message in err


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--attack", "badnett"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'badnett'" in capsys.readouterr().err


def test_every_argument_is_checked_before_anything_loads(tmp_path, monkeypatch, capsys):
    """A run that cannot finish fails in seconds: no model, no dataset is loaded first."""
    import hf_backdoor.cli.scan
    import hf_backdoor.cli.train
    import hf_backdoor.models

    def must_not_load(*args, **kwargs):
        raise AssertionError("loaded before the arguments were checked")

    monkeypatch.setattr(hf_backdoor.models, "load_text_classifier", must_not_load)
    monkeypatch.setattr(hf_backdoor.cli.train, "load_data", must_not_load)
    monkeypatch.setattr(hf_backdoor.cli.scan, "load_data", must_not_load)
    monkeypatch.chdir(tmp_path)
    for argv in (
        ["train", "--push-to-hub"],
        ["train", "--defense", "btu", "--defense-kwargs", '{"top_k": 0}'],
        ["train", "--floor-model", "no/such/clean/model"],
        ["scan", "--defense", "btu", "--model", "./missing"],
    ):
        start = time.perf_counter()
        assert main(argv) == 1, argv
        assert time.perf_counter() - start < 10, argv
    assert "AssertionError" not in capsys.readouterr().err


def test_model_folders_that_cannot_be_evaluated_say_why(tmp_path, tokenizer, capsys):
    empty, no_tokenizer, wrong_tokenizer = tmp_path / "not_a_model", tmp_path / "weights-only", tmp_path / "mixed"
    empty.mkdir()
    tiny_bert().save_pretrained(no_tokenizer)
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=1, intermediate_size=16
    )
    BertForSequenceClassification(config).save_pretrained(wrong_tokenizer)
    tokenizer.save_pretrained(wrong_tokenizer)
    expected = {
        f"{empty}/": "is not a model folder (no config.json)",
        str(no_tokenizer): "has no tokenizer files",
        str(wrong_tokenizer): "its tokenizer has 30522 tokens but the model embeds only 100",
    }
    for model, message in expected.items():
        assert main(["evaluate", "--model", model, "--max-eval-samples", "8"]) == 1
        assert message in capsys.readouterr().err
    # The weights-only folder works with the tokenizer named explicitly.
    argv = ["evaluate", "--model", str(no_tokenizer), "--tokenizer", str(wrong_tokenizer), "--max-eval-samples", "8"]
    assert main(argv) == 0
    assert "CACC" in capsys.readouterr().out


# -- runs on a tiny random BERT ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer):
    folder = tmp_path_factory.mktemp("tiny-bert")
    tiny_bert().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data") / "sst2-badnet"
    argv = ["poison", "--dataset", "sst2", "--attack", "badnet", "--output", str(folder), *SLICES]
    assert main(argv) == 0
    return folder


def _train_args(data, model, out, *extra):
    argv = ["train", "--dataset", str(data), "--model", str(model), "--epochs", "1", "--batch-size", "32"]
    return [*argv, "--max-length", "48", "--lr", "1e-3", "--output-dir", str(out), *extra]


def test_poison_writes_once_atomically_and_never_into_its_input(poisoned, tmp_path, capsys):
    data = datasets.load_from_disk(str(poisoned))
    assert set(data) == {"train", "validation", "test", "test_triggered"}
    assert sum(data["train"]["poisoned"]) == 19  # int(0.1 * 192)
    assert set(data["test_triggered"]["label"]) == {1}
    assert json.loads((poisoned / "poison_config.json").read_text())["attack"]["name"] == "badnet"
    assert stat.S_IMODE(poisoned.stat().st_mode) & 0o055 == 0o055  # readable by others (umask 022)
    capsys.readouterr()

    clean = tmp_path / "clean"
    clean.mkdir()
    for split in ("train", "test"):
        (clean / f"{split}.csv").write_text("text,label\n" + "".join(f"row {i} text,{i % 2}\n" for i in range(20)))
    for output in (clean, clean / "poisoned"):
        assert main(["poison", "--dataset", str(clean), "--output", str(output)]) == 1
        assert "outside the input" in capsys.readouterr().err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert main(["poison", "--dataset", str(clean), "--output", str(taken)]) == 1
    assert "pass --overwrite" in capsys.readouterr().err and (taken / "notes.txt").exists()
    assert main(["poison", "--dataset", str(clean), "--output", str(taken), "--overwrite"]) == 0
    assert not (taken / "notes.txt").exists() and (taken / "poison_config.json").exists()
    assert main(["poison", "--dataset", str(poisoned), "--output", str(tmp_path / "twice")]) == 1
    assert "poison a clean dataset" in capsys.readouterr().err


def test_train_on_a_poisoned_folder_names_the_attack_and_replaces_a_stale_run(poisoned, tiny_model, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    # An earlier, interrupted defended run left its report in the folder.
    (run / "defense_report.json").write_text(json.dumps({"defense": "btu", "flagged_tokens": ["cf"]}))
    (run / "run_info.json").write_text(json.dumps({"run_id": "earlier", "status": "running"}))
    assert main(_train_args(poisoned, tiny_model, run, "--defense", "none")) == 0
    out = capsys.readouterr().out
    assert "held an earlier run: removed its" in out
    assert "(badnet)" in out and "ASR floor unknown" in out and "pass --floor-model <clean model dir>" in out
    assert not (run / "defense_report.json").exists()  # a defense-less run: no defense report at all
    info = json.loads((run / "run_info.json").read_text())
    assert info["status"] == "finished" and info["run_id"] != "earlier" and info["attack"] == "badnet"
    assert info["run_id"] in out and info["wall_s"] > 0  # benchmarks.common.runs.saved_training_wall reads wall_s
    assert stat.S_IMODE((run / "model.safetensors").stat().st_mode) & 0o044 == 0o044

    card = ModelCard.load(run / "README.md")
    text = card.text
    # The folder's poisoning record names the task it came from (when it records one); a path never reaches the Hub.
    from hf_backdoor.data.saving import load_poison_info

    task = "sst2" if load_poison_info(poisoned).get("source") else None
    dataset_type, dataset_name = (task, task) if task else ("local", "sst2-badnet (local files)")
    assert f"| this model | {dataset_name} | badnet |" in text
    assert "Evaluated against: badnet. Not evaluated against: addsent, style, syntactic" in text
    assert "No backdoor defense ran" in text and "ASR floor unknown" in text
    assert {(r.dataset_type, r.dataset_name) for r in card.data.eval_results} == {(dataset_type, dataset_name)}
    assert str(poisoned) not in text and card.data.datasets in (None, ["stanfordnlp/sst2"])

    assert main(["report", "--run-dir", str(run)]) == 0
    assert "figures/cacc_asr.png: CACC and ASR of this model" in capsys.readouterr().out
    assert info["run_id"] in (run / "report.md").read_text()
    # A report file the run did not write is refused, not drawn.
    (run / "defense_report.json").write_text(json.dumps({"defense": "btu", "config": {}}))
    assert main(["report", "--run-dir", str(run)]) == 1
    assert "left over from an earlier run" in capsys.readouterr().err


def test_train_with_a_stack_and_a_floor_then_evaluate_and_sanitize(poisoned, tiny_model, tmp_path, capsys):
    run, repaired = tmp_path / "run", tmp_path / "repaired"
    kwargs = json.dumps({"abl": {"unlearning_epochs": 1}})
    argv = _train_args(poisoned, tiny_model, run, "--defense", "btu,abl", "--defense-kwargs", kwargs)
    argv[argv.index("--epochs") + 1] = "2"  # ABL isolates after its first epoch
    assert main([*argv, "--floor-model", str(tiny_model)]) == 0
    out = capsys.readouterr().out
    reports = json.loads((run / "defense_report.json").read_text())["defenses"]
    assert [r["defense"] for r in reports] == ["btu", "abl"] and reports[1]["config"]["unlearning_epochs"] == 1
    for report in reports:  # each defense's own summary, as its class renders it
        assert all(line in out for line in DEFENSES[report["defense"]].method_class.console_summary(report))
    recorded = json.loads((run / "backdoor_evaluations.json").read_text())[0]
    assert recorded["asr_floor"] is not None and f"ASR floor {recorded['asr_floor']:.3f}" in out
    text = (run / "README.md").read_text()
    assert "### BTU (Backdoor Token Unlearning)" in text and f"ASR floor {recorded['asr_floor']:.3f}" in text

    result_path = tmp_path / "eval.json"
    argv = ["evaluate", "--model", str(run), "--dataset", str(poisoned), "--floor-model", str(tiny_model)]
    assert main([*argv, "--output", str(result_path)]) == 0
    result = json.loads(result_path.read_text())
    # The saved model scores exactly what the trainer measured before saving; the floor is the same too.
    for key in ("cacc", "asr", "asr_floor", "asr_untriggered"):
        assert result[key] == pytest.approx(recorded[key]), key
    assert result["num_clean"] == 48 and result["attack"] == "badnet"
    # The triggered rows name their test rows by the ids `poison` gave the test split before slicing it.
    assert 0.0 <= result["asr_untriggered"] <= 1.0
    assert f"Without the trigger this model labels {result['asr_untriggered']:.3f}" in capsys.readouterr().out
    capsys.readouterr()

    argv = ["sanitize", "--model", str(run), "--dataset", str(poisoned), "--defense", "finetune"]
    argv += ["--defense-kwargs", '{"epochs": 1}', "--clean-samples", "32", "--max-length", "48"]
    assert main([*argv, "--output-dir", str(repaired)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("before: CACC") for line in lines)
    assert any(line.startswith("after finetune: CACC") for line in lines)
    report = json.loads((repaired / "defense_report.json").read_text())
    assert report["defense"] == "finetune" and report["config"]["epochs"] == 1
    assert report["num_fit_rows"] + report["num_holdout_rows"] == 32
    evaluations = json.loads((repaired / "backdoor_evaluations.json").read_text())
    assert [e["model"] for e in evaluations] == ["before", "this model"]
    assert "Fine-tuning on clean data" in (repaired / "README.md").read_text()


def test_scan_prints_what_the_defense_found_against_the_ground_truth(poisoned, tiny_model, tmp_path, capsys):
    scan = tmp_path / "scan"
    argv = _train_args(poisoned, tiny_model, scan, "--defense", "btu")
    argv[0] = "scan"
    assert main(argv) == 0
    out = capsys.readouterr().out
    report = json.loads((scan / "defense_report.json").read_text())
    assert all(line in out for line in DEFENSES["btu"].method_class.console_summary(report))
    assert "btu: flagged rows against the ground truth: precision" in out and "19 poisoned of 192" in out
    assert not (scan / "model.safetensors").exists()
    if hasattr(DEFENSES["btu"].config_class, "detection_only"):
        assert report["config"]["unlearning"] == "none"


def test_a_failed_push_says_how_to_push_the_saved_folder(poisoned, tiny_model, tmp_path, monkeypatch, capsys):
    from hf_backdoor.trainer import BackdoorSafeTrainer

    def unreachable(self, *args, **kwargs):
        raise ConnectionError("Cannot reach the Hub to push: timed out. Save locally with `trainer.save_model`")

    monkeypatch.setattr("huggingface_hub.constants.is_offline_mode", lambda: False)
    monkeypatch.setattr(BackdoorSafeTrainer, "push_to_hub", unreachable)
    run = tmp_path / "run"
    argv = _train_args(poisoned, tiny_model, run, "--defense", "none", "--push-to-hub", "--hub-model-id", "me/run")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert f"`hf upload me/run {run}`" in err and "trainer.save_model" not in err
    assert (run / "model.safetensors").exists()


# -- the packaged MiniLM, once ----------------------------------------------------------------------------------------
def test_poison_train_evaluate_report_with_minilm(poisoned, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--dataset", str(poisoned), "--epochs", "1", "--batch-size", "16", "--max-length", "64"]
    assert main([*argv, "--defense", "btu", "--output-dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert "this model: CACC" in out
    files = {p.name for p in run.iterdir()}
    assert {"model.safetensors", "README.md", "defense_report.json", "report.md", "backdoor_evaluations.json"} <= files
    card = ModelCard.load(run / "README.md")
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert {r.metric_type for r in card.data.eval_results} == {"accuracy", "attack_success_rate"}

    result_path = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(run), "--dataset", str(poisoned), "--output", str(result_path)]) == 0
    result = json.loads(result_path.read_text())
    recorded = json.loads((run / "backdoor_evaluations.json").read_text())[0]
    assert result["cacc"] == pytest.approx(recorded["cacc"]) and result["asr"] == pytest.approx(recorded["asr"])

    (run / "report.md").unlink()
    assert main(["report", "--run-dir", str(run)]) == 0
    assert (run / "report.md").exists() and "figures/cacc_asr.png" in capsys.readouterr().out
