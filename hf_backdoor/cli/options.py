"""The options the subcommands share, as dataclasses that ``transformers.HfArgumentParser`` turns into flags.

Every field carries ``metadata={"help": ...}``; the help formatter shows each flag's default (or "required"), so
``hf-backdoor <command> --help`` documents every flag. A subcommand module lists the dataclasses it takes
(``DATACLASSES``); recipes can build the same flags with ``HfArgumentParser(<module>.DATACLASSES)``.

The CLI names no defense and no attack: the defense flags are resolved by
``BackdoorSafeTrainingArguments.defense_config()`` through the registry, the help lists what is registered, and each
defense config's fields (with their help) are listed in the subcommand's epilog.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from .. import defenses as _defenses  # noqa: F401  (importing registers the built-in defenses listed in the help)
from ..arguments import BackdoorSafeTrainingArguments
from ..data import TASKS
from ..defenses.base import defense_specs
from ..registry import DEFENSES

TRIGGERED_SPLIT = "test_triggered"  # the ASR rows `hf-backdoor poison` writes beside the test split


class CommandError(Exception):
    """A failure the user can fix; printed without a traceback, with what to change."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every option's default (or that it is required) and keeps the epilog's line breaks."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required:
            return f"{text} (required)"
        if "%(default)" in text or "default:" in text.lower() or action.default is argparse.SUPPRESS:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return f"{text} (default: %(default)s)"
        return text


def _help(text: str, **extra) -> dict[str, Any]:
    return {"help": text, **extra}


def positive(flag: str, value: int | float | None) -> None:
    if value is not None and value <= 0:
        kind = "integer" if isinstance(value, int) else "number"
        raise ValueError(f"--{flag} must be a positive {kind}, got {value}.")


def output_dir_field(default: str, contents: str):
    """``--output-dir`` of a command that writes a run folder: its default and what the folder receives."""
    return field(default=default, metadata=_help(f"folder for {contents}"))


def overwrite_field():
    """``--overwrite``: the flag :func:`~hf_backdoor.cli.common.check_output_dir` reads."""
    return field(default=False, metadata=_help("write into a non-empty --output-dir that holds no earlier run"))


def _json_object(flag: str, text: str | None, example: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--{flag} is not valid JSON ({error}); e.g. '{example}'.") from None
    if not isinstance(value, dict):
        raise ValueError(f"--{flag} must be a JSON object, e.g. '{example}'; got {text!r}.")
    return value


def _training_arguments_help(name: str) -> str:
    """The help of a ``BackdoorSafeTrainingArguments`` field: one text for the library and the CLI."""
    return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(BackdoorSafeTrainingArguments)}[name]


def default_defense(stage: str) -> str | None:
    """The defense a subcommand runs when ``--defense`` is not given: the library's recommendation for ``stage``,
    which ``hf_backdoor.defenses.DEFAULT_DEFENSES`` names (the CLI names none)."""
    from .. import defenses

    return getattr(defenses, "DEFAULT_DEFENSES", {}).get(stage)


def registered_defenses(stage: str) -> list[str]:
    return sorted(name for name, entry in DEFENSES.items() if getattr(entry.method_class, "stage", None) == stage)


def split_names(values: list[str] | str | None) -> list[str]:
    """``["a", "b"]`` from ``--defense a b``, ``--defense a,b`` or a mix; ``none`` means no defense."""
    if values is None:
        return []
    items = [values] if isinstance(values, str) else values
    names = [name.strip() for item in items for name in str(item).split(",") if name.strip()]
    return [name for name in names if name.lower() != "none"]


# -------------------------------------------------------------------------------------------------------- data
@dataclass
class DataArguments:
    """Which data a command reads, and how much of it."""

    dataset: str = field(
        default="sst2",
        metadata=_help(
            f"packaged task ({', '.join(TASKS)}; offline), a Hub dataset id, a local csv/tsv/json/parquet file or "
            "folder, or a folder written by `hf-backdoor poison`"
        ),
    )
    text_column: str | None = field(
        default=None, metadata=_help("text column of a Hub or local dataset (default: `text`, or the task's own)")
    )
    label_column: str | None = field(
        default=None, metadata=_help("label column of a Hub or local dataset (default: `label`, or the task's own)")
    )
    max_eval_samples: int | None = field(
        default=None, metadata=_help("seeded random slice of the test split and its triggered rows (default: all rows)")
    )
    seed: int = field(default=0, metadata=_help("seeds poisoning, slicing, training and the defenses"))

    def __post_init__(self):
        positive("max-eval-samples", self.max_eval_samples)


@dataclass
class TrainDataArguments(DataArguments):
    """Data of a command that trains: the training split can be sliced too."""

    max_train_samples: int | None = field(
        default=None, metadata=_help("seeded random slice of the training split (default: all rows)")
    )

    def __post_init__(self):
        super().__post_init__()
        positive("max-train-samples", self.max_train_samples)


# ------------------------------------------------------------------------------------------------------ attacks
@dataclass
class TriggerArguments:
    """The attack whose triggered test rows measure the ASR (nothing is poisoned)."""

    attack: str | None = field(
        default=None,
        metadata=_help(
            "the attack whose triggers are put into the test split's non-target rows to measure the ASR (default: "
            "the triggered rows of a `hf-backdoor poison` folder; none for other data: no ASR)"
        ),
    )
    target_label: int | None = field(
        default=None,
        metadata=_help("label id the backdoor sends triggered rows to (default: the task's usual target, else 1)"),
    )
    triggers: str | None = field(
        default=None,
        metadata=_help("trigger words of a word-insertion attack, comma-separated (default: the attack's own)"),
    )
    attack_kwargs: str | None = field(
        default=None,
        metadata=_help("more fields of the attack config as JSON, e.g. '{\"num_triggers\": 3}' (default: none)"),
    )

    def __post_init__(self):
        if self.target_label is not None and self.target_label < 0:
            raise ValueError(f"--target-label must be a label id (>= 0), got {self.target_label}.")
        self.attack_fields = _json_object("attack-kwargs", self.attack_kwargs, '{"num_triggers": 3}') or {}


@dataclass
class AttackArguments(TriggerArguments):
    """The attack that poisons the training split (and whose triggered test rows measure the ASR)."""

    attack: str | None = field(
        default=None,
        metadata=_help(
            "poison the training split with this attack first (an experiment) and measure the ASR on its triggered "
            "test rows (default: none, the data is used as it is)"
        ),
    )
    poison_rate: float = field(
        default=0.1, metadata=_help("fraction of the training split poisoned: int(rate * rows) rows, in (0, 1]")
    )
    mode: Literal["dirty", "clean-label", "mix"] = field(
        default="dirty",
        metadata=_help(
            "dirty: trigger non-target rows and relabel them to the target; clean-label: trigger target rows, keep "
            "their labels; mix: trigger rows of any label, relabelled to the target"
        ),
    )


@dataclass
class PoisonAttackArguments(AttackArguments):
    """``poison`` always poisons."""

    attack: str = field(default="badnet", metadata=_help("the attack that poisons the training split"))


# ------------------------------------------------------------------------------------------------------- models
@dataclass
class ModelArguments:
    """The model a command fine-tunes."""

    model: str | None = field(
        default=None,
        metadata=_help(
            "Hub id or local folder of the model to fine-tune (default: the packaged MiniLM-L6, no download)"
        ),
    )
    max_length: int = field(default=128, metadata=_help("tokens per text; longer texts are truncated"))
    batch_size: int = field(default=32, metadata=_help("batch size per device, for training and prediction"))

    def __post_init__(self):
        positive("max-length", self.max_length)
        positive("batch-size", self.batch_size)


@dataclass
class SavedModelArguments:
    """A saved model a command reads (evaluate, sanitize)."""

    model: str = field(
        metadata=_help("folder written by `hf-backdoor train`/`sanitize` or `save_pretrained`, or a Hub model id")
    )
    tokenizer: str | None = field(
        default=None,
        metadata=_help("tokenizer folder or Hub id, for a model folder saved without one (default: the model's own)"),
    )
    max_length: int = field(default=128, metadata=_help("tokens per text; longer texts are truncated"))
    batch_size: int = field(default=64, metadata=_help("batch size per device for prediction"))

    def __post_init__(self):
        positive("max-length", self.max_length)
        positive("batch-size", self.batch_size)


@dataclass
class FloorArguments:
    """The clean reference model whose ASR on the same triggered rows is the ASR floor."""

    floor_model: str | None = field(
        default=None,
        metadata=_help(
            "a model trained on clean data (folder or Hub id, same task): its ASR on the same triggered rows is "
            "the ASR floor, without which an ASR cannot be told from plain error (default: none, floor unknown)"
        ),
    )
    undefended_model: str | None = field(
        default=None,
        metadata=_help(
            "a model trained on the same poisoned data without a defense (folder or Hub id): measured on the same rows "
            "so the output, the card and the report show CACC and ASR before and after the defense (default: none)"
        ),
    )


# ----------------------------------------------------------------------------------------------------- defenses
def _defense_help(stage: str) -> str:
    names = ", ".join(registered_defenses(stage)) or "none registered"
    return f"{_training_arguments_help('defense')} Registered: {names}; `none` runs without a defense."


@dataclass
class DefenseArguments:
    """The defenses that run during training (a stack runs in the order given)."""

    defense: list[str] = field(
        default_factory=lambda: [name for name in [default_defense("training")] if name] or ["none"],
        metadata=_help(_defense_help("training")),
    )
    defense_kwargs: str | None = field(
        default=None, metadata=_help(f"{_training_arguments_help('defense_kwargs')} (default: the configs' defaults)")
    )

    stage = "training"

    def __post_init__(self):
        self.defense_names = split_names(self.defense)
        self.defense_fields = _json_object("defense-kwargs", self.defense_kwargs, '{"flip_threshold": 0.7}')
        if self.defense_fields and not self.defense_names:
            raise ValueError("--defense-kwargs needs --defense: name the defense the fields belong to.")


@dataclass
class RepairArguments(DefenseArguments):
    """The post-training repairs ``sanitize`` runs, in order."""

    defense: list[str] = field(
        default_factory=lambda: [name for name in [default_defense("repair")] if name] or ["none"],
        metadata=_help(
            "post-training repairs run in order on the saved model with the clean rows. Registered: "
            f"{', '.join(registered_defenses('repair')) or 'none'}."
        ),
    )
    defense_kwargs: str | None = field(
        default=None,
        metadata=_help(
            "fields of the repair config as JSON, e.g. '{\"epochs\": 1}'; for several repairs, one object per name "
            "(default: the configs' defaults)"
        ),
    )

    stage = "repair"


def check_defense_fields(defense_args: DefenseArguments) -> list[dict]:
    """The ``{"name": ..., **fields}`` spec of each defense, after checking that each field exists on its config (a
    typo gets the closest field name, not a ``__init__() got an unexpected keyword`` error)."""
    import difflib

    if not defense_args.defense_names:
        return []
    specs = defense_specs(defense_args.defense_names, defense_args.defense_fields, flag="--defense-kwargs")
    for spec in specs:
        entry = DEFENSES.get(spec["name"])
        if entry is None:
            raise ValueError(
                f"--defense {spec['name']}: no such defense; registered {defense_args.stage}-stage defenses: "
                f"{', '.join(registered_defenses(defense_args.stage))}."
            )
        stage = getattr(entry.method_class, "stage", None)
        if stage != defense_args.stage:
            how = (
                f"run it on the trained model with `hf-backdoor sanitize --model <run dir> --defense {spec['name']}`"
                if stage == "repair"
                else f"run it while training with `hf-backdoor train --defense {spec['name']}`"
            )
            raise ValueError(f"--defense {spec['name']} is a {stage}-stage defense: {how}.")
        known = [f.name for f in dataclasses.fields(entry.config_class) if f.init]
        for name in sorted(set(spec) - {"name"} - set(known)):
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" Its fields: {', '.join(known)}."
            raise ValueError(f"--defense-kwargs: {spec['name']} has no field {name!r}.{hint}")
    return specs


def defense_epilog(stage: str) -> str:
    """Each registered defense of ``stage``: its title, citation and config fields with their help."""
    import shutil
    import textwrap

    width = min(shutil.get_terminal_size().columns, 120) - 2
    lines = [f"{'Defenses' if stage == 'training' else 'Repairs'} and their --defense-kwargs fields:"]
    for name in registered_defenses(stage):
        config_class = DEFENSES[name].config_class
        title = getattr(config_class, "title", "")
        citation = getattr(config_class, "citation", "")
        lines.append(f"\n  {name}" + (f": {title}" if title else "") + (f" ({citation})" if citation else ""))
        for f in dataclasses.fields(config_class):
            if not f.init:
                continue
            if f.default is not dataclasses.MISSING:
                default = repr(f.default)
            elif f.default_factory is not dataclasses.MISSING:
                default = repr(f.default_factory())
            else:
                default = "required"
            text = f"{f.name} = {default}: {f.metadata.get('help') or '(no help yet)'}"
            lines.append(textwrap.fill(text, width, initial_indent="    ", subsequent_indent="        "))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- parser plumbing
def prefer_dashes(parser: argparse.ArgumentParser) -> None:
    """List ``--max-length`` before ``--max_length`` (HfArgumentParser adds both), so usage and help show the
    dashed spelling the documentation uses; both keep working."""
    for action in parser._actions:
        action.option_strings = sorted(action.option_strings, key=lambda option: "_" in option)


def set_choices(parser: argparse.ArgumentParser, dest: str, choices: list[str]) -> None:
    """Restrict an option built from a dataclass field to ``choices`` (names known only once methods registered)."""
    for action in parser._actions:
        if action.dest == dest:
            action.choices = choices


def dataclasses_from_namespace(dataclass_types, namespace: argparse.Namespace) -> list:
    """Build each dataclass from the parsed flags (what ``HfArgumentParser.parse_args_into_dataclasses`` does, for a
    subcommand's namespace)."""
    values = vars(namespace)
    return [
        dtype(**{f.name: values[f.name] for f in dataclasses.fields(dtype) if f.init and f.name in values})
        for dtype in dataclass_types
    ]
