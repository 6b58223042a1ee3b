"""The one-defense protocol (hf_backdoor/defenses/base.py), checked on every registered defense and on a plugin.

Every defense that ``import hf_backdoor`` registers: its config builds with defaults and documents every field, its
state survives ``torch.save``/``torch.load(weights_only=True)``, its report is JSON and renders (scalars, card
section, limits, figures) from the saved JSON alone. Training-stage defenses run a tiny training through
``BackdoorSafeTrainer`` and log their scalars; repair-stage defenses run through ``trainer.sanitize``/``expose``.
A plugin defense defined in one file (tests/toy_defense.py) runs in a stack with BTU and reaches the card, the
report and the CLI. Stacks that cannot work fail at construction with a ValueError that says what to do.
"""

import ast
import copy
import dataclasses
import importlib
import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import Trainer

import hf_backdoor  # registers every built-in defense
from hf_backdoor.defenses.base import (
    STAGES,
    Defense,
    DefenseConfig,
    Figure,
    build_defense,
    defense_class_for_report,
    reports_from_json,
)
from hf_backdoor.registry import DEFENSES, defense_entry, register_defense
from tests.conftest import registered, text_trainer, tiny_bert

pytestmark = pytest.mark.usefixtures("one_thread")

BUILT_IN = sorted(DEFENSES)  # read at collection, before any test registers a defense of its own
TRAINING = [name for name in BUILT_IN if DEFENSES[name].method_class.stage == "training"]
REPAIR = [name for name in BUILT_IN if DEFENSES[name].method_class.stage == "repair"]
TOY_MODULE = "tests.toy_defense"
PACKAGE_DIR = Path(hf_backdoor.__file__).resolve().parent

# Repairs run on 100 clean rows and a tiny model; their official epoch counts would only cost time here. A field is
# shortened only where the config has it, so a repair added later runs with its defaults unless it shares a name.
SHORT_REPAIR_FIELDS = {
    "epochs": 1,
    "teacher_epochs": 1,
    "finetune_epochs": 1,
    "recovering_epochs": 2,
    "unlearning_max_epochs": 20,
    "batch_size": 40,
}


# -- helpers ----------------------------------------------------------------------------------------------------------
@pytest.fixture
def toy():
    """tests/toy_defense.py imported as a user would (registering ``"toy"``), and forgotten afterwards."""
    sys.modules.pop(TOY_MODULE, None)
    module = importlib.import_module(TOY_MODULE)
    yield module
    DEFENSES.pop("toy", None)
    sys.modules.pop(TOY_MODULE, None)


def as_json(obj):
    """``obj`` as a saved report holds it (tuples become lists); fails for anything JSON cannot hold."""
    return json.loads(json.dumps(obj))


def same_state(a, b) -> bool:
    """Deep equality of two state dicts (tensors compared exactly, dtype and all)."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def assert_state_round_trips(defense: Defense, path: Path) -> None:
    """``state_dict()`` goes through the checkpoint format (``weights_only=True``) into a fresh defense, unchanged."""
    state = defense.state_dict()
    assert isinstance(state, dict)
    torch.save(state, path)
    loaded = torch.load(path, weights_only=True)  # fails for numpy arrays and arbitrary objects
    fresh = build_defense(copy.deepcopy(defense.config))
    fresh.load_state_dict(loaded)
    assert same_state(fresh.state_dict(), state), f"{defense.name}: the state changed through save and load"


def assert_report_renders(report: dict, output_dir: Path) -> None:
    """The report is JSON, and every rendering hook gives the same result from the saved JSON as from the live
    report (a saved defense_report.json is all the card, the run report and the CLI get)."""
    cls = defense_class_for_report(report)
    assert cls is not None, f"no registered defense wrote {report.get('defense')!r}"
    saved = as_json(report)
    assert DEFENSES[saved["defense"]].method_class is cls and saved["config"]["name"] == saved["defense"]
    scalars = cls.report_scalars(saved)
    assert all(isinstance(k, str) and type(v) is float for k, v in scalars.items()), scalars
    assert scalars == cls.report_scalars(report)
    section = cls.card_section(saved)
    assert isinstance(section, str) and section.strip(), f"{saved['defense']}: empty card section"
    assert section == cls.card_section(report)
    limits = cls.card_limits(saved)
    assert isinstance(limits, list) and all(isinstance(line, str) and line.strip() for line in limits)
    assert all(isinstance(line, str) for line in cls.console_summary(saved))
    for figure in cls.figures(saved, output_dir):
        assert isinstance(figure, Figure) and figure.caption
        assert (output_dir / figure.path).is_file() or Path(figure.path).is_file(), figure


# -- every registered defense -------------------------------------------------------------------------------------------
def test_every_method_module_registers_its_defense():
    assert {"btu", "abl"} <= set(TRAINING)
    assert {"rnp", "nad", "nwc", "finetune", "expose"} <= set(REPAIR)
    assert set(BUILT_IN) == set(TRAINING) | set(REPAIR)


def _registered_in_source() -> dict[str, str]:
    """Config class name -> module, for every module-level ``register_defense(Config, Defense)`` in hf_backdoor/."""
    found = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            call = node.value if isinstance(node, ast.Expr) else None
            func = getattr(call, "func", None)
            if isinstance(call, ast.Call) and getattr(func, "id", getattr(func, "attr", None)) == "register_defense":
                if call.args and isinstance(call.args[0], ast.Name):
                    found[call.args[0].id] = str(path.relative_to(PACKAGE_DIR.parent))
    return found


def test_import_hf_backdoor_registers_every_defense_in_the_source():
    # A defense module nothing imports registers nothing: the trainer, the CLI and the cards would not know its name.
    script = (
        "import hf_backdoor\n"
        "from hf_backdoor.registry import DEFENSES\n"
        "print(' '.join(sorted(entry.config_class.__name__ for entry in DEFENSES.values())))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    registered_at_import = set(done.stdout.split())
    in_source = _registered_in_source()
    missing = {name: module for name, module in in_source.items() if name not in registered_at_import}
    assert in_source and not missing, f"`import hf_backdoor` does not import these defense modules: {missing}"


@pytest.mark.parametrize("name", BUILT_IN)
def test_config_builds_with_defaults_and_documents_every_field(name):
    config_class, defense_class = DEFENSES[name]
    assert issubclass(config_class, DefenseConfig) and issubclass(defense_class, Defense)
    assert config_class.name == name and defense_class.stage in STAGES
    config = config_class()
    assert config.to_dict()["name"] == name
    undocumented = [f.name for f in dataclasses.fields(config) if not str(f.metadata.get("help", "")).strip()]
    assert not undocumented, f"{config_class.__name__} fields without metadata={{'help': ...}}: {undocumented}"
    for spec in (name, {"name": name}, config, config_class()):
        assert type(build_defense(spec)) is defense_class
    json.dumps(config.to_dict())  # the report carries the config


@pytest.mark.parametrize("name", BUILT_IN)
def test_a_fresh_defense_has_a_json_report_and_a_state_that_round_trips(name, tmp_path):
    defense = build_defense(name)
    report = defense.report()
    assert report["defense"] == name and as_json(report["config"]) == as_json(defense.config.to_dict())
    assert_state_round_trips(defense, tmp_path / "state.pt")


@pytest.mark.parametrize("name", TRAINING)
def test_training_defense_runs_logs_its_scalars_and_round_trips(name, tmp_path, tiny_train, tokenizer):
    trainer = text_trainer(tmp_path, tiny_train, tokenizer, defense=name, args=dict(num_train_epochs=2))
    assert [d.name for d in trainer.defenses] == [name] and trainer.defense is trainer.defenses[0]
    trainer.train()
    report = trainer.defense_report
    assert report == trainer.defense.report() and reports_from_json(report) == [report]
    written = json.loads((tmp_path / "defense_report.json").read_text())
    assert written.pop("run_id") == trainer.run_id and written == as_json(report)
    scalars = type(trainer.defense).report_scalars(report)
    assert scalars, f"{name} reports no scalar to log"
    last_logged = {k: v for entry in trainer.state.log_history for k, v in entry.items() if k.startswith(f"{name}/")}
    assert {f"{name}/{k}": v for k, v in scalars.items()}.items() <= last_logged.items()
    assert_report_renders(report, tmp_path)
    assert_state_round_trips(trainer.defense, tmp_path / "state.pt")


@pytest.fixture(scope="module")
def trained_model(tiny_train, tokenizer, tmp_path_factory):
    """A tiny BERT trained (no defense) on the poisoned rows: something for a repair to repair."""
    trainer = text_trainer(
        tmp_path_factory.mktemp("trained"),
        tiny_train,
        tokenizer,
        cls=Trainer,
        args=dict(num_train_epochs=4, learning_rate=3e-3, logging_steps=1000),
    )
    trainer.train()
    return trainer.model


@pytest.mark.parametrize("name", REPAIR)
def test_repair_defense_runs_through_the_trainer(name, tmp_path, trained_model, tiny_train, clean_rows, tokenizer):
    config_class = DEFENSES[name].config_class
    names = {f.name for f in dataclasses.fields(config_class)}
    config = config_class(**{k: v for k, v in SHORT_REPAIR_FIELDS.items() if k in names})
    trainer = text_trainer(tmp_path, tiny_train, tokenizer, model=copy.deepcopy(trained_model))
    run = trainer.expose if name == "expose" else trainer.sanitize
    run(clean_rows, config)
    report = trainer.defense_reports[-1]
    assert report["defense"] == name and as_json(report["config"]) == as_json(config.to_dict())
    assert_report_renders(report, tmp_path)
    # A repair never runs inside training: a stack that holds one fails at construction, saying where it goes.
    with pytest.raises(ValueError, match=rf"'{name}' is a repair-stage defense .*trainer\.(sanitize|expose)\("):
        text_trainer(tmp_path, tiny_train, tokenizer, defense=["btu", name])


# -- the registry ---------------------------------------------------------------------------------------------------------
def test_registering_a_name_twice_raises_and_keeps_the_first():
    entry = DEFENSES["btu"]

    @dataclass
    class Impostor(DefenseConfig):
        name = "btu"

    with pytest.raises(ValueError, match="'btu' is already registered"):
        register_defense(Impostor, Defense)
    assert DEFENSES["btu"] is entry


def test_a_subclass_of_a_registered_config_is_that_defense(tmp_path, tiny_train, tokenizer):
    from hf_backdoor.defenses import BTUConfig

    @dataclass
    class StrictBTU(BTUConfig):
        """A user's preset: flag only tokens that flip nearly every row."""

        flip_threshold: float = field(default=0.9, metadata={"help": "Stricter than BTU's default."})

    assert defense_entry(StrictBTU) is DEFENSES["btu"] and "StrictBTU" not in str(sorted(DEFENSES))
    defense = build_defense(StrictBTU())
    assert type(defense) is DEFENSES["btu"].method_class and defense.config.flip_threshold == 0.9
    assert defense.name == "btu" and defense.report()["config"]["flip_threshold"] == 0.9
    trainer = text_trainer(tmp_path, tiny_train, tokenizer, defense=StrictBTU(top_k=5))
    assert trainer.defense.config.top_k == 5 and isinstance(trainer.defense.config, StrictBTU)
    with pytest.raises(ValueError, match="flip_threshold must be in"):
        StrictBTU(flip_threshold=2.0)  # the parent's checks still run


# -- stacks -----------------------------------------------------------------------------------------------------------------
def test_a_plugin_defense_stacks_with_btu_into_the_logs_the_report_and_the_card(toy, tmp_path, tiny_train, tokenizer):
    from hf_backdoor.defenses import BTUConfig

    trainer = text_trainer(
        tmp_path,
        tiny_train,
        tokenizer,
        defense=[BTUConfig(flip_threshold=0.5, top_k=20), toy.ToyConfig(unit="rows")],
        args=dict(num_train_epochs=2),
    )
    assert [d.name for d in trainer.defenses] == ["btu", "toy"] and trainer.defense is None
    trainer.train()
    btu, counted = trainer.defense_reports
    assert btu["defense"] == "btu" and btu["rounds"]
    assert counted == {"defense": "toy", "config": {"name": "toy", "unit": "rows"}, "rows_seen": 512, "epochs_seen": 2}
    assert trainer.defense_report == {"defense": "stack", "defenses": [btu, counted]}
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert {"toy/rows_seen", "toy/epochs_seen"} <= logged and any(k.startswith("btu/") for k in logged)
    assert_report_renders(counted, tmp_path)

    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert reports_from_json(json.loads((out / "defense_report.json").read_text())) == [btu, counted]
    toy_section = toy.ToyDefense.card_section(counted)
    assert toy_section == "- The toy counted **512** rows in 2 epochs."
    card = (out / "README.md").read_text()
    assert toy_section in card, "the card leaves out the plugin defense's section"
    assert DEFENSES["btu"].method_class.card_section(btu) in card
    assert toy_section in (out / "report.md").read_text(), "the run report leaves out the plugin defense"


def test_the_cli_trains_a_stack_with_a_plugin_defense(toy, tmp_path, tokenizer, capsys):
    from hf_backdoor.cli import main

    DEFENSES.pop("toy", None)  # the CLI itself must import the plugin
    sys.modules.pop(TOY_MODULE, None)
    model_dir, data_dir, run_dir = tmp_path / "tiny-bert", tmp_path / "sst2-badnet", tmp_path / "run"
    tiny_bert().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    slices = ["--max-train-samples", "192", "--max-eval-samples", "48"]
    assert main(["poison", "--dataset", "sst2", "--attack", "badnet", "--output", str(data_dir), *slices]) == 0
    argv = ["train", "--import-module", TOY_MODULE, "--defense", "btu", "toy", "--model", str(model_dir)]
    argv += ["--dataset", str(data_dir), "--epochs", "1", "--batch-size", "16", "--max-length", "64"]
    assert main([*argv, "--output-dir", str(run_dir)]) == 0
    reports = reports_from_json(json.loads((run_dir / "defense_report.json").read_text()))
    assert [r["defense"] for r in reports] == ["btu", "toy"] and reports[1]["rows_seen"] == 192
    assert "The toy counted **192**" in (run_dir / "README.md").read_text()


def _trainer_with(defense, tmp_path, tiny_train, tokenizer):
    return text_trainer(tmp_path, tiny_train, tokenizer, defense=defense)


def test_a_repair_defense_in_a_training_stack_says_where_it_belongs(tmp_path, tiny_train, tokenizer):
    @dataclass
    class LateRepairConfig(DefenseConfig):
        name = "late_repair"

    class LateRepair(Defense):
        stage = "repair"

    with registered(LateRepairConfig, LateRepair):
        with pytest.raises(ValueError, match=r"'late_repair' is a repair-stage defense .*trainer\.sanitize"):
            _trainer_with(["btu", LateRepairConfig()], tmp_path, tiny_train, tokenizer)


def test_the_same_defense_twice_is_an_error(tmp_path, tiny_train, tokenizer):
    from hf_backdoor.defenses import BTUConfig

    with pytest.raises(ValueError, match=r"runs each defense once; \['btu'\] appear more than once"):
        _trainer_with([BTUConfig(), BTUConfig(top_k=5)], tmp_path, tiny_train, tokenizer)


def test_two_defenses_that_own_the_loss_are_an_error(tmp_path, tiny_train, tokenizer):
    @dataclass
    class FirstLossConfig(DefenseConfig):
        name = "first_loss"

    @dataclass
    class SecondLossConfig(DefenseConfig):
        name = "second_loss"

    class OwnsLoss(Defense):
        owns_loss = True

    with registered(FirstLossConfig, OwnsLoss), registered(SecondLossConfig, OwnsLoss):
        with pytest.raises(ValueError, match=r"\['first_loss', 'second_loss'\] each compute the training loss"):
            _trainer_with([FirstLossConfig(), SecondLossConfig()], tmp_path, tiny_train, tokenizer)


def test_btu_masking_and_abl_both_own_the_loss(tmp_path, tiny_train, tokenizer):
    # BTU only computes a loss when it masks its isolated rows; ABL always computes one (LGA, then masking).
    from hf_backdoor.defenses import ABLConfig, BTUConfig

    with pytest.raises(ValueError, match=r"\['btu', 'abl'\] each compute the training loss"):
        _trainer_with([BTUConfig(isolated_rows="mask"), ABLConfig()], tmp_path, tiny_train, tokenizer)
    trainer = _trainer_with([BTUConfig(isolated_rows="relabel"), ABLConfig()], tmp_path, tiny_train, tokenizer)
    assert [d.name for d in trainer.defenses] == ["btu", "abl"]


def test_defense_state_checkpoint_holds_every_defense_of_the_stack(toy, tmp_path, tiny_train, tokenizer):
    """The checkpoint file is ``{"format": 2, "defenses": [{"name", "state"}, ...]}`` and loads with
    ``weights_only=True``; resuming restores each defense's state."""
    from hf_backdoor.trainer import DEFENSE_STATE_NAME

    args = dict(num_train_epochs=2, save_strategy="epoch")
    trainer = text_trainer(tmp_path, tiny_train, tokenizer, defense=["btu", "toy"], args=args)
    trainer.train()
    saved = torch.load(tmp_path / "checkpoint-8" / DEFENSE_STATE_NAME, weights_only=True)
    assert saved["format"] == 2 and [entry["name"] for entry in saved["defenses"]] == ["btu", "toy"]
    assert saved["defenses"][1]["state"] == {"rows_seen": 256, "epochs_seen": 1}
    assert saved["defenses"][0]["state"]["detection_done"]

    resumed = text_trainer(tmp_path / "resumed", tiny_train, tokenizer, defense=["btu", "toy"], args=args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
    assert resumed.defenses[1].report()["rows_seen"] == 512
    other_stack = text_trainer(tmp_path / "other", tiny_train, tokenizer, defense=["toy", "btu"], args=args)
    with pytest.raises(ValueError, match="resume with the same defense stack"):
        other_stack.train(resume_from_checkpoint=str(tmp_path / "checkpoint-8"))
