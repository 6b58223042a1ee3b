"""Model card, run report and Hub push of a BackdoorSafeTrainer (tiny random BERT, real tokenizer and SST-2 rows).

The card and the report render each defense through its class (``card_section``, ``card_limits``, ``figures``), so
these tests compare against what the defense class renders, and check the parts the card owns: the evaluation table,
the ASR floor, the warnings, the model-index, the attacks not evaluated and the run folder's bookkeeping.
"""

import json
import stat
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from hf_backdoor import BadNetConfig, BTUConfig, make_asr_dataset, poison_dataset, tokenize_dataset
from hf_backdoor.defenses.base import Defense, reports_from_json
from hf_backdoor.hub.cards import build_model_card, dataset_fields
from hf_backdoor.hub.evaluations import evaluation_notes, evaluation_warnings
from hf_backdoor.hub.reports import report_from_folder, write_report
from hf_backdoor.registry import DEFENSES
from tests.conftest import text_trainer

BTU = DEFENSES["btu"].method_class
HUB_DIR = Path(__file__).resolve().parents[1] / "hf_backdoor"


@pytest.fixture(scope="module")
def trained(sst2, tokenizer, tmp_path_factory):
    attack = BadNetConfig(triggers=("cf",), poison_rate=0.2)
    train = tokenize_dataset(poison_dataset(sst2["train"].select(range(256)), attack), tokenizer, max_length=64)
    test = tokenize_dataset(sst2["test"].select(range(64)), tokenizer, max_length=64)
    asr = tokenize_dataset(make_asr_dataset(sst2["test"].select(range(64)), attack), tokenizer, max_length=64)
    trainer = text_trainer(
        tmp_path_factory.mktemp("run"),
        train,
        tokenizer,
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
    report = trainer.defense_report
    btu_figures = {figure.path for figure in BTU.figures(report, tmp_path / "btu-only")}
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "defense_report.json"} <= files
    assert {"backdoor_evaluations.json", "report.md", "figures/cacc_asr.png", *btu_figures} <= files
    saved = json.loads((tmp_path / "defense_report.json").read_text())
    assert saved["flagged_ids"] == report["flagged_ids"]

    card = ModelCard.load(tmp_path / "README.md")
    # The model-index round-trips through huggingface_hub's parser: the Hub will render CACC and ASR.
    results = {r.metric_type: r for r in card.data.eval_results}
    assert results["accuracy"].metric_value == pytest.approx(after["cacc"])
    assert results["attack_success_rate"].metric_value == pytest.approx(after["asr"])
    assert results["accuracy"].dataset_type == "sst2" and results["accuracy"].task_type == "text-classification"
    assert {"hf-backdoor", "backdoor-defense", "btu"} <= set(card.data.tags)
    assert card.data.library_name == "transformers"

    text = card.text
    assert "| undefended | sst2 | badnet | 0.810 | 0.970 | unknown |" in text  # before, as recorded
    assert f"| this model | sst2 | badnet | {after['cacc']:.3f} | {after['asr']:.3f} | unknown |" in text
    assert "undefended: ASR floor unknown" in text and "--floor-model <clean model dir>" in text
    assert "Not evaluated against: addsent, style, syntactic" in text
    # The defense's own rendering, found through the registry: the card names no defense itself.
    assert BTU.card_section(report) in text
    assert all(line in text for line in BTU.card_limits(report))
    assert "It ran the backdoor defense **BTU (Backdoor Token Unlearning)** during fine-tuning." in text
    assert "Jiang et al., AAAI 2025" in text
    assert '"flip_threshold": 0.5' in text and "transformers " in text and "torch " in text
    assert "| seed (training / defense) | 0 / 0 |" in text
    assert "randomly initialised or unrecorded base model" in text  # a tiny random model has no base to name
    caption = (
        "CACC and ASR of undefended and this model; ASR floor unknown (no clean model scored on the same rows); "
        "the dashed line over each CACC bar is chance"
    )
    assert f"![{caption}](figures/cacc_asr.png)" in text


def test_make_readable_opens_what_the_umask_allows(tmp_path):
    """safetensors writes model.safetensors through a 0600 temporary file: published artefacts get the read bits
    the umask allows (0644 under 022), never more."""
    import os

    from hf_backdoor.hub.run_folder import make_readable

    weights, folder = tmp_path / "model.safetensors", tmp_path / "figures"
    weights.write_bytes(b"x")
    folder.mkdir()
    os.chmod(weights, 0o600)
    os.chmod(folder, 0o700)
    old = os.umask(0o022)
    try:
        make_readable(tmp_path)
        assert stat.S_IMODE(weights.stat().st_mode) == 0o644 and stat.S_IMODE(folder.stat().st_mode) == 0o755
        os.chmod(weights, 0o600)
        os.umask(0o077)  # a user who keeps files private keeps them private
        make_readable(weights)
        assert stat.S_IMODE(weights.stat().st_mode) == 0o600
    finally:
        os.umask(old)


def test_the_card_shows_the_floor_and_warns_when_the_asr_means_nothing(trained, tmp_path):
    trainer, _ = trained
    saved = list(trainer.backdoor_evaluations)
    trainer.backdoor_evaluations = [
        {"model": "this model", "cacc": 0.86, "asr": 0.12, "asr_floor": 0.10, "attack": "badnet", "dataset": "sst2"},
        {"model": "collapsed", "cacc": 0.51, "asr": 1.0, "attack": "badnet", "prediction_shares": [0.02, 0.98]},
        {"model": "matched", "cacc": 0.85, "asr": 0.2, "asr_floor": 0.1, "asr_untriggered": 0.18, "attack": "badnet"},
    ]
    try:
        text = build_model_card(trainer).text
    finally:
        trainer.backdoor_evaluations = saved
    assert "| this model | sst2 | badnet | 0.860 | 0.120 | 0.100 |" in text
    assert "this model: ASR floor 0.100" in text
    assert "collapsed: CACC 0.510 is at or near chance (0.500, guessing among 2 classes)" in text
    assert "collapsed: The model predicts class 1 for 98% of the clean rows" in text
    assert "this model: CACC" not in text  # 0.86 on two classes is far from chance
    # Where evaluate_backdoor matched the ASR rows to their clean rows, the card says how the model reads them
    # without the trigger: here most of the ASR above the floor is not the trigger's.
    assert "the backdoor is gone. Without the trigger this model labels 0.180 of the same rows as the target." in text
    assert text.count("Without the trigger") == 1


def test_evaluation_warnings_read_chance_from_the_class_balance():
    balanced = {"cacc": 0.52, "asr": 0.9, "num_labels": 2}
    assert "at or near chance (0.500" in evaluation_warnings(balanced)[0]
    skewed = {"cacc": 0.80, "majority_share": 0.78, "prediction_shares": [0.0, 1.0]}
    warnings = evaluation_warnings(skewed)
    assert "at or near chance (0.780, always predicting the most frequent class)" in warnings[0]
    assert "predicts class 1 for 100%" in warnings[1]
    assert evaluation_warnings({"cacc": 0.9, "num_labels": 2, "prediction_shares": [0.5, 0.5]}) == []
    assert evaluation_notes([{"cacc": 0.9, "asr": None}]) == []  # no ASR, no floor to ask for


def test_a_stack_gets_one_section_per_defense_and_unknown_defenses_still_render(trained):
    trainer, _ = trained
    btu = trainer.defense_report
    foreign = {"defense": "not_installed", "config": {"name": "not_installed", "k": 3}, "score": 0.25}
    trainer.defense_report = {"defense": "stack", "defenses": [btu, foreign]}
    try:
        text = build_model_card(trainer).text
    finally:
        trainer.defense_report = btu
    assert "### BTU (Backdoor Token Unlearning)\n\n" + BTU.card_section(btu) in text
    assert "### NOT_INSTALLED\n\n" + Defense.card_section(foreign) in text
    assert "defenses **BTU (Backdoor Token Unlearning)** during fine-tuning, then **NOT_INSTALLED**." in text


def test_a_local_dataset_path_never_becomes_a_hub_dataset(trained, tmp_path):
    trainer, _ = trained
    local = tmp_path / "sst2-badnet"
    local.mkdir()
    assert dataset_fields(str(local)) == ("local", "sst2-badnet (local files)")
    assert dataset_fields("sst2") == ("sst2", "sst2")
    card = build_model_card(trainer, dataset=str(local))
    assert card.data.datasets is None
    assert build_model_card(trainer, dataset="sst2").data.datasets == ["stanfordnlp/sst2"]  # the packaged copy's source


def test_cards_reports_and_cli_name_no_defense():
    """Issue 21: rendering goes through the defense classes; no name switch is left in these modules."""
    sources = [*(HUB_DIR / "hub").glob("*.py"), *(HUB_DIR / "cli").glob("*.py")]
    assert len(sources) >= 10
    for path in sources:
        text = path.read_text()
        for name in DEFENSES:
            assert f'"{name}"' not in text and f"'{name}'" not in text, f"{path.name} names the defense {name!r}"


def test_push_to_hub_uploads_exactly_the_saved_folder(trained, tmp_path, monkeypatch):
    import fnmatch

    import transformers.trainer

    trainer, _ = trained
    uploaded = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("RepoUrl", (), {"repo_id": f"user/{repo_id}"})()

        def upload_folder(self, repo_id, folder_path, ignore_patterns, token=None, **kwargs):
            root = Path(folder_path)
            files = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}
            uploaded["repo"], uploaded["token"] = repo_id, token
            uploaded["files"] = {f for f in files if not any(fnmatch.fnmatch(f, pat) for pat in ignore_patterns)}

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: FakeApi())
    monkeypatch.setattr("huggingface_hub.constants.is_offline_mode", lambda: False)
    trainer.args.output_dir = str(tmp_path / "sanitized-minilm")
    trainer.hub_model_id = None
    trainer.push_to_hub(token="hf_test_token", dataset="sst2")
    assert uploaded["repo"] == "user/sanitized-minilm" and uploaded["token"] == "hf_test_token"
    figures = {f.path for f in write_report(tmp_path / "redraw", trainer.defense_report, trainer.backdoor_evaluations)}
    assert uploaded["files"] - figures == {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "training_args.bin",
        "README.md",
        "defense_report.json",
        "hf_backdoor_run.json",
        "backdoor_evaluations.json",
        "report.md",
    }
    assert figures <= uploaded["files"]


def test_push_offline_is_a_clear_error(trained, monkeypatch):
    trainer, _ = trained
    monkeypatch.setattr("huggingface_hub.constants.is_offline_mode", lambda: True)
    with pytest.raises(ConnectionError, match="offline mode is on.*trainer.save_model"):
        trainer.push_to_hub()


def test_report_is_rebuilt_from_a_saved_folder_and_refuses_what_is_not_its_run(trained, tmp_path):
    trainer, _ = trained
    trainer.save_model(str(tmp_path))
    (tmp_path / "report.md").unlink()
    figures = report_from_folder(tmp_path)
    assert (tmp_path / "report.md").exists() and len(figures) >= 2
    report_text = (tmp_path / "report.md").read_text()
    assert BTU.card_section(trainer.defense_report) in report_text
    with pytest.raises(FileNotFoundError, match="holds no saved model"):
        report_from_folder(tmp_path / "figures")
    # A defense report another run left in the folder is not reported as this model's.
    stale = reports_from_json(json.loads((tmp_path / "defense_report.json").read_text()))[0]
    (tmp_path / "defense_report.json").write_text(json.dumps({**stale, "run_id": "an-earlier-run"}))
    with pytest.raises(ValueError, match="belongs to run an-earlier-run.*left over from an earlier run"):
        report_from_folder(tmp_path)
