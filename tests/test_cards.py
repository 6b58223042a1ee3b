"""Model card, run report and Hub push of a BackdoorSafeTrainer (tiny random BERT, real tokenizer and SST-2 rows)."""

import json

import pytest
from huggingface_hub import ModelCard
from transformers import DataCollatorWithPadding

from hf_backdoor import BadNetConfig, BTUConfig, make_asr_dataset, poison_dataset, tokenize_dataset
from hf_backdoor.trainer import BackdoorSafeTrainer
from tests.test_trainer import _args, tiny_bert


@pytest.fixture(scope="module")
def trained(sst2, tokenizer, tmp_path_factory):
    attack = BadNetConfig(triggers=("cf",), poison_rate=0.2)
    train = tokenize_dataset(poison_dataset(sst2["train"].select(range(256)), attack), tokenizer, max_length=64)
    test = tokenize_dataset(sst2["test"].select(range(64)), tokenizer, max_length=64)
    asr = tokenize_dataset(make_asr_dataset(sst2["test"].select(range(64)), attack), tokenizer, max_length=64)
    out = tmp_path_factory.mktemp("run")
    trainer = BackdoorSafeTrainer(
        model=tiny_bert(),
        args=_args(out, num_train_epochs=2),
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        defense=BTUConfig(flip_threshold=0.5, top_k=20),
    )
    trainer.train()
    trainer.add_backdoor_evaluation(model="undefended", cacc=0.81, asr=0.97, attack="badnet", dataset="sst2")
    after = trainer.evaluate_backdoor(test, asr, target_label=1, attack="badnet", dataset_name="sst2")
    return trainer, after


def test_save_model_writes_weights_card_report_and_figures(trained, tmp_path):
    trainer, after = trained
    trainer.save_model(str(tmp_path))
    files = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "defense_report.json"} <= files
    assert {"backdoor_evaluations.json", "report.md", "figures/cacc_asr.png", "figures/btu_token_scores.png"} <= files
    assert (
        json.loads((tmp_path / "defense_report.json").read_text())["flagged_ids"]
        == (trainer.defense_report["flagged_ids"])
    )

    card = ModelCard.load(tmp_path / "README.md")
    # The model-index round-trips through huggingface_hub's parser: the Hub will render CACC and ASR.
    results = {r.metric_type: r for r in card.data.eval_results}
    assert results["accuracy"].metric_value == pytest.approx(after["cacc"])
    assert results["attack_success_rate"].metric_value == pytest.approx(after["asr"])
    assert results["accuracy"].dataset_type == "sst2" and results["accuracy"].task_type == "text-classification"
    assert {"hf-backdoor", "backdoor-defense", "btu"} <= set(card.data.tags)
    assert card.data.library_name == "transformers"

    text = card.text
    assert "| undefended | sst2 | badnet | 0.810 | 0.970 |" in text  # before, as recorded
    assert f"| this model | sst2 | badnet | {after['cacc']:.3f} | {after['asr']:.3f} |" in text  # after, measured
    assert "Not evaluated against: addsent, style, syntactic" in text
    assert "Syntactic and style (paraphrase) triggers" in text  # BTU's known blind spot stated
    assert '"flip_threshold": 0.5' in text and "transformers " in text and "torch " in text
    assert "| seed (training / defense) | 0 / 0 |" in text
    flagged = trainer.defense_report["flagged_tokens"]
    assert all(f"`{token}`" in text for token in flagged) if flagged else "trigger tokens: **none**" in text
    assert "randomly initialised or unrecorded base model" in text  # a tiny random model has no base to name
    assert "![CACC and ASR before and after the defense](figures/cacc_asr.png)" in text


def test_push_to_hub_uploads_exactly_the_saved_folder(trained, tmp_path, monkeypatch):
    import fnmatch

    import transformers.trainer

    trainer, _ = trained
    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("RepoUrl", (), {"repo_id": f"user/{repo_id}"})()

        def upload_folder(self, repo_id, folder_path, ignore_patterns, token=None, **kwargs):
            root = __import__("pathlib").Path(folder_path)
            files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
            uploaded["repo"], uploaded["token"] = repo_id, token
            uploaded["files"] = {f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in ignore_patterns)}

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: FakeApi())
    monkeypatch.setattr("huggingface_hub.constants.is_offline_mode", lambda: False)
    trainer.args.output_dir = str(tmp_path / "sanitized-minilm")
    trainer.hub_model_id = None
    trainer.push_to_hub(token="hf_test_token", dataset="sst2")
    assert uploaded["repo"] == "user/sanitized-minilm" and uploaded["token"] == "hf_test_token"
    assert uploaded["files"] == {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "training_args.bin",
        "README.md",
        "defense_report.json",
        "backdoor_evaluations.json",
        "report.md",
        "figures/cacc_asr.png",
        "figures/btu_token_scores.png",
        "figures/btu_flip_rates.png",
    }


def test_push_offline_is_a_clear_error(trained, monkeypatch):
    trainer, _ = trained
    monkeypatch.setattr("huggingface_hub.constants.is_offline_mode", lambda: True)
    with pytest.raises(ConnectionError, match="offline mode is on.*trainer.save_model"):
        trainer.push_to_hub()


def test_report_is_rebuilt_from_a_saved_folder(trained, tmp_path):
    from hf_backdoor.reports import report_from_folder

    trainer, _ = trained
    trainer.save_model(str(tmp_path))
    (tmp_path / "report.md").unlink()
    figures = report_from_folder(tmp_path)
    assert (tmp_path / "report.md").exists() and len(figures) >= 2
    with pytest.raises(FileNotFoundError, match="has no defense_report.json"):
        report_from_folder(tmp_path / "figures")
