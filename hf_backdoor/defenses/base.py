"""The one protocol every defense implements, training-time or post-training.

A defense is one module: a config dataclass (``DefenseConfig``), a :class:`Defense` and one registration line
(``register_defense(MyConfig, MyDefense)``, from the leaf :mod:`hf_backdoor.registry`). The trainer, the model card,
the run report and the CLI only call the methods below; none of them names a defense.

Training-time defenses (``stage = "training"``) are driven by ``BackdoorSafeTrainer`` in stack order:

- ``check_trainer(trainer)``: when the trainer is built; raise if the model or data cannot work with the defense.
- ``on_train_begin(trainer)``: before the first step (exposure, detection that needs no trained model).
- ``on_epoch_end(trainer)``: after each epoch (detection from the model being trained).
- ``prepare_inputs(trainer, inputs)``: rewrite a training batch (strip tokens, relabel rows). The batch's row ids
  are ``trainer.batch_row_ids``.
- ``compute_loss(trainer, model, inputs, return_outputs)``: the training loss as a *mean over the micro-batch's
  rows*, or ``None`` to leave it to the Trainer (or to a later defense of the stack). The trainer scales it under
  gradient accumulation, so a defense never divides by the accumulation steps itself. At most one defense of a
  stack may return a loss (``owns_loss = True``).
- ``on_train_end(trainer)``: after the last step (unlearning, repair).

Post-training repairs (``stage = "repair"``) implement ``repair(context, model)`` and are run by
``trainer.sanitize(clean_dataset, config)`` or ``trainer.expose(...)``.

Every defense keeps what must survive ``resume_from_checkpoint`` in ``state_dict()``, and describes what it found
in ``report()`` (a JSON-serialisable dict). The report is rendered by class methods, so a saved
``defense_report.json`` is enough to rebuild the card section, the logged scalars and the figures.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..registry import DEFENSES, defense_entry, register_defense

__all__ = [
    "DEFENSES",
    "STAGES",
    "Defense",
    "DefenseConfig",
    "Figure",
    "build_defense",
    "build_defenses",
    "defense_class_for_report",
    "defense_specs",
    "register_defense",
    "reports_from_json",
]

STAGES = ("training", "repair")


def _type_matches(value: Any, hint: Any) -> bool:
    """Whether ``value`` fits the simple annotations configs use (int, float, bool, str, ``X | None``, tuples,
    lists, dicts, Literal). Unknown annotations are accepted: this catches wrong types, it is not a type checker."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_matches(value, arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return True


def _in_interval(value: float, interval: str) -> bool:
    """Whether ``value`` lies in ``interval``: ``"> 0"``, ``">= 1"`` or a bracketed range like ``"(0, 1]"``."""
    if interval.startswith(">="):
        return value >= float(interval[2:])
    if interval.startswith(">"):
        return value > float(interval[1:])
    low, high = (float(bound) for bound in interval[1:-1].split(","))
    above = value >= low if interval[0] == "[" else value > low
    below = value <= high if interval[-1] == "]" else value < high
    return above and below


@dataclass
class DefenseConfig:
    """Base of every defense config.

    Subclasses declare their fields with ``field(default=..., metadata={"help": ...})`` (the CLI and the recipes
    build their flags from them) and validate values in ``__post_init__``. Field types are checked before a
    subclass's ``__post_init__`` runs, so ``flip_threshold="0.7"`` fails with a message naming the field instead of a
    comparison error deep inside.
    """

    name: ClassVar[str] = "base"
    title: ClassVar[str] = ""
    citation: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("__post_init__")

        def __post_init__(self, _own=own, _cls=cls):
            self._check_field_types()
            if _own is not None:
                _own(self)
            else:
                super(_cls, self).__post_init__()

        # Wrap the subclass's own check (or add one) so the type check always runs first.
        cls.__post_init__ = __post_init__

    def __post_init__(self) -> None:
        self._check_field_types()

    def _check_field_types(self) -> None:
        try:
            hints = typing.get_type_hints(type(self))
        except (NameError, TypeError):  # an annotation that cannot be resolved: nothing to check against
            return
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            hint = hints.get(f.name)
            if hint is not None and not _type_matches(value, hint):
                expected = getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
                raise TypeError(
                    f"{type(self).__name__}.{f.name} must be {expected}, got {type(value).__name__} {value!r}."
                )
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{type(self).__name__}.{f.name} must be finite, got {value}.")

    # -- value checks for subclasses' __post_init__ (one message shape: "<field> must be <rule>, got <value>.") --
    def _check_interval(self, interval: str, *names: str, optional: bool = False) -> None:
        """Raise unless each field of ``names`` lies in ``interval``, written as in the message: ``"(0, 1]"``,
        ``"[0, 1)"``, ``"> 0"`` or ``">= 1"``. ``optional``: ``None`` is allowed too (and named in the message)."""
        for field_name in names:
            value = getattr(self, field_name)
            if optional and value is None:
                continue
            if value is None or not _in_interval(value, interval):
                rule = interval if interval[0] in "<>" else f"in {interval}"
                raise ValueError(f"{field_name} must be {rule}{' or None' if optional else ''}, got {value}.")

    def _check_positive(self, *names: str, optional: bool = False) -> None:
        self._check_interval("> 0", *names, optional=optional)

    def _check_at_least(self, minimum: int, *names: str, optional: bool = False) -> None:
        self._check_interval(f">= {minimum}", *names, optional=optional)

    def _check_choice(self, field_name: str, choices: tuple) -> None:
        value = getattr(self, field_name)
        if value not in choices:
            raise ValueError(f"{field_name} must be one of {choices}, got {value!r}.")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}

    @classmethod
    def field_help(cls) -> dict[str, str]:
        """Each field's help text (what the CLI and the recipes show)."""
        return {f.name: f.metadata.get("help", "") for f in dataclasses.fields(cls)}


@dataclass
class Figure:
    """A figure a defense (or the run report) drew: its caption and its file."""

    caption: str
    path: str


class Defense:
    """A defense. Every hook defaults to doing nothing; see the module docstring for the protocol."""

    stage: ClassVar[str] = "training"
    # True when compute_loss may return the training loss; a stack allows one such defense.
    owns_loss: ClassVar[bool] = False
    # Names of defenses this one cannot run with in a stack, and why (shown in the error).
    incompatible_with: ClassVar[dict[str, str]] = {}
    # For repair-stage defenses: the trainer method that runs them (`trainer.sanitize` or `trainer.expose`).
    repair_entry_point: ClassVar[str] = "sanitize"
    # The trainer keeps a `row_index` column in the training set, so trainer.batch_row_ids names each batch row.
    needs_row_ids: ClassVar[bool] = False
    # Markdown bullet lines on what this defense does not cover, whatever it found (the default card_limits).
    limitations: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: DefenseConfig):
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    # -- training-stage hooks ------------------------------------------------------------------------------------
    def check_trainer(self, trainer) -> None:
        """Raise, when the trainer is built, if this defense cannot work with its model or data (fail before any
        training, and say which models are supported)."""

    def on_train_begin(self, trainer) -> None:
        pass

    def on_epoch_end(self, trainer) -> None:
        pass

    def prepare_inputs(self, trainer, inputs: dict) -> dict:
        return inputs

    def compute_loss(self, trainer, model, inputs: dict, return_outputs: bool = False):
        return None

    def on_train_end(self, trainer) -> None:
        pass

    # -- repair-stage entry point --------------------------------------------------------------------------------
    def repair(self, context, model) -> dict[str, Any]:
        """Repair ``model`` in place with the context's clean rows; return the report's fields."""
        raise NotImplementedError(f"{type(self).__name__} is a {self.stage}-stage defense and has no repair().")

    # -- state and report ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def report(self) -> dict[str, Any]:
        return {"defense": self.config.name, "config": self.config.to_dict()}

    # -- rendering of a saved report (class methods: no live defense needed) -------------------------------------
    @classmethod
    def report_scalars(cls, report: dict[str, Any]) -> dict[str, float]:
        """Numbers to log through the Trainer's loggers: top-level numbers and ``timings_s``."""
        out = {}
        for key, value in report.items():
            if isinstance(value, bool) or value is None:
                continue
            if isinstance(value, (int, float)):
                out[key] = float(value)
            elif key == "timings_s" and isinstance(value, dict):
                out.update({f"timings_s/{k}": float(v) for k, v in value.items() if isinstance(v, (int, float))})
        return out

    @classmethod
    def card_section(cls, report: dict[str, Any]) -> str:
        """Markdown findings for the model card and the run report."""
        scalars = {
            k: v for k, v in report.items() if isinstance(v, (int, float, str)) and k not in ("defense", "stage")
        }
        if not scalars:
            return "_See `defense_report.json`._"
        return "\n".join(f"- `{k}`: {v}" for k, v in scalars.items())

    @classmethod
    def card_limits(cls, report: dict[str, Any]) -> list[str]:
        """What this defense does not cover, for the card's limitations: :attr:`limitations` unless a subclass
        words them from the report."""
        return list(cls.limitations)

    @classmethod
    def figures(cls, report: dict[str, Any], output_dir: Path) -> list[Figure]:
        """Figures drawn from the report into ``output_dir``."""
        return []

    @classmethod
    def console_summary(cls, report: dict[str, Any]) -> list[str]:
        """Short lines the CLI prints after a run."""
        return []


def _as_config(spec: Any) -> DefenseConfig:
    if isinstance(spec, DefenseConfig):
        defense_entry(spec)  # raises for a config class nobody registered
        return spec
    if isinstance(spec, str):
        spec = {"name": spec}
    if isinstance(spec, dict):
        fields = dict(spec)
        name = fields.pop("name", None)
        return defense_entry(name).config_class(**fields)
    raise TypeError(
        f"A defense is a config (e.g. BTUConfig()), a registered name, a {{'name': ..., **fields}} dict or a list of "
        f"those; got {type(spec).__name__}. Registered defenses: {sorted(DEFENSES)}."
    )


def build_defense(spec: Any) -> Defense | None:
    """One defense from a config, a name or ``{"name": ..., **fields}`` (``None`` gives ``None``)."""
    if spec is None:
        return None
    config = _as_config(spec)
    return defense_entry(config).method_class(config)


def build_defenses(spec: Any, stage: str = "training") -> list[Defense]:
    """The defenses of a stack, in order, after checking that they can run together in ``stage``."""
    if spec is None:
        return []
    specs = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    defenses = [build_defense(s) for s in specs]
    names = [d.name for d in defenses]
    for defense in defenses:
        if defense.stage != stage:
            hint = (
                f"run it after training with `trainer.{defense.repair_entry_point}(clean_dataset, "
                f"{type(defense.config).__name__}(...))`"
                if defense.stage == "repair"
                else "pass it to BackdoorSafeTrainer(defense=...)"
            )
            raise ValueError(
                f"{defense.name!r} is a {defense.stage}-stage defense and cannot run in a {stage} stack: {hint}."
            )
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"A stack runs each defense once; {duplicates} appear more than once in {names}.")
    owners = [d.name for d in defenses if d.owns_loss]
    if len(owners) > 1:
        raise ValueError(
            f"{owners} each compute the training loss themselves, and a stack can use only one such loss. "
            f"Keep one of them; defenses that only rewrite batches or act between epochs stack with it."
        )
    for defense in defenses:
        for other in defenses:
            reason = defense.incompatible_with.get(other.name)
            if reason:
                raise ValueError(f"{defense.name!r} cannot be stacked with {other.name!r}: {reason}")
    return defenses


def defense_specs(names: list[str], fields: dict[str, Any] | None, flag: str = "defense_kwargs") -> list[dict]:
    """``[{"name": ..., **fields}]`` per named defense: ``fields`` is one object of fields for a single defense, or one
    object per name for a stack (``{"btu": {...}, "abl": {...}}``)."""
    fields = dict(fields or {})
    if not names:
        if fields:
            raise ValueError(f"{flag} is set but no defense is named: name the defense, e.g. defense=['btu'].")
        return []
    per_name = len(names) > 1 or (fields and set(fields) <= set(names))
    if not per_name:
        return [{"name": names[0], **fields}]
    unknown = sorted(set(fields) - set(names))
    if unknown:
        raise ValueError(
            f"{flag} names {unknown}, which are not among the defenses {names}: key the fields by defense name, "
            'e.g. {"' + names[0] + '": {...}}.'
        )
    return [{"name": name, **(fields.get(name) or {})} for name in names]


def defense_class_for_report(report: dict[str, Any]) -> type[Defense] | None:
    """The registered defense class that wrote ``report``, or ``None`` for a name no installed module registers."""
    name = report.get("defense") if isinstance(report, dict) else None
    if name in DEFENSES:
        return DEFENSES[name].method_class
    return None


def reports_from_json(obj: Any) -> list[dict[str, Any]]:
    """The defense reports in a ``defense_report.json``: one report, or a stack ``{"defenses": [...]}``."""
    if obj is None:
        return []
    if isinstance(obj, list):
        return [r for r in obj if isinstance(r, dict)]
    if isinstance(obj, dict) and isinstance(obj.get("defenses"), list):
        return [r for r in obj["defenses"] if isinstance(r, dict)]
    if isinstance(obj, dict) and obj.get("defense"):
        return [obj]
    return []
