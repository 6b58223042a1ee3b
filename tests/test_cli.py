"""The ``hf-backdoor`` command line: argument errors, exit codes, and a small end-to-end run on real SST-2 rows."""

import json

import datasets
import pytest
from huggingface_hub import ModelCard

from hf_backdoor.cli import main


@pytest.mark.parametrize("command", ["poison", "train", "scan", "evaluate", "sanitize", "report"])
def test_every_subcommand_explains_itself(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: hf-backdoor " + command in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["poison", "--dataset", "sst3", "--output", "x"], "Packaged tasks (offline): sst2, imdb, hsol"),
        (["poison", "--poison-rate", "1.5", "--output", "x"], "poison_rate must be in"),
        (["poison"], "Say where the poisoned dataset goes"),
        (["train", "--max-train-samples", "0"], "--max-train-samples must be a positive integer"),
        (["train", "--defense-kwargs", "{flip"], "--defense-kwargs is not valid JSON"),
        (["train", "--defense-kwargs", '{"flip_treshold": 0.7}'], "a field btu does not take"),
        (["train", "--defense-kwargs", '{"flip_threshold": 7}'], "flip_threshold must be in"),
        (["evaluate", "--model", "no/such/folder"], "does not exist"),
        (["report", "--run-dir", "."], "has no defense_report.json"),
        (["sanitize", "--model", ".", "--defense", "prune"], "Unknown"),
    ],
)
def test_errors_exit_1_with_what_to_fix(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"hf-backdoor {argv[0]}: error: ") and message in err


def test_bad_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--attack", "badnett"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'badnett'" in capsys.readouterr().err


def test_poison_train_evaluate_report_end_to_end(tmp_path, capsys):
    data_dir, run_dir = tmp_path / "sst2-badnet", tmp_path / "run"
    slice_args = ["--max-train-samples", "192", "--max-eval-samples", "48"]
    assert main(["poison", "--dataset", "sst2", "--attack", "badnet", "--output", str(data_dir), *slice_args]) == 0
    poisoned = datasets.load_from_disk(str(data_dir))
    assert set(poisoned) == {"train", "validation", "test", "test_triggered"}
    assert sum(poisoned["train"]["poisoned"]) == 19  # int(0.1 * 192)
    assert set(poisoned["test_triggered"]["label"]) == {1}

    train_args = ["train", "--dataset", str(data_dir), "--epochs", "1", "--batch-size", "16", "--max-length", "64"]
    assert main([*train_args, "--output-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "CACC" in out and "flagged tokens:" in out
    files = {p.name for p in run_dir.iterdir()}
    assert {"model.safetensors", "README.md", "defense_report.json", "report.md", "backdoor_evaluations.json"} <= files
    card = ModelCard.load(run_dir / "README.md")
    assert card.data.base_model == "sentence-transformers/all-MiniLM-L6-v2"
    assert {r.metric_type for r in card.data.eval_results} == {"accuracy", "attack_success_rate"}

    result_path = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(run_dir), "--dataset", str(data_dir), "--output", str(result_path)]) == 0
    result = json.loads(result_path.read_text())
    recorded = json.loads((run_dir / "backdoor_evaluations.json").read_text())[0]
    # The saved model scores exactly what the trainer measured before saving.
    assert result["cacc"] == pytest.approx(recorded["cacc"]) and result["asr"] == pytest.approx(recorded["asr"])
    assert result["num_clean"] == 48 and result["num_asr"] == len(poisoned["test_triggered"])
    scan_dir = tmp_path / "scan"
    assert main(["scan", *train_args[1:], "--output-dir", str(scan_dir)]) == 0
    scan_out = capsys.readouterr().out
    report = json.loads((scan_dir / "defense_report.json").read_text())
    assert f"candidates ({len(report['candidate_ids'])}):" in scan_out
    assert "against the ground truth: precision" in scan_out  # the poisoned dataset carries its ground truth
    assert report["config"]["unlearning"] == "none" and not (scan_dir / "model.safetensors").exists()

    sanitize_dir = tmp_path / "sanitized"
    sanitize_args = ["sanitize", "--model", str(run_dir), "--dataset", str(data_dir), "--defense", "finetune"]
    sanitize_args += ["--defense-kwargs", '{"epochs": 1}', "--clean-samples", "32", "--max-length", "64"]
    assert main([*sanitize_args, "--output-dir", str(sanitize_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("before") and "CACC" in line for line in lines)
    assert any(line.startswith("after finetune") and "ASR" in line for line in lines)
    sanitize_report = json.loads((sanitize_dir / "defense_report.json").read_text())
    assert sanitize_report["defense"] == "finetune" and sanitize_report["config"]["epochs"] == 1
    assert sanitize_report["num_fit_rows"] + sanitize_report["num_holdout_rows"] == 32
    assert (sanitize_dir / "model.safetensors").exists()
    assert [e["model"] for e in json.loads((sanitize_dir / "backdoor_evaluations.json").read_text())] == [
        "before",
        "this model",
    ]
    assert "finetune" in ModelCard.load(sanitize_dir / "README.md").text

    (run_dir / "report.md").unlink()
    assert main(["report", "--run-dir", str(run_dir)]) == 0
    assert (run_dir / "report.md").exists() and "figures/cacc_asr.png" in capsys.readouterr().out
