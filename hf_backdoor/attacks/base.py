"""The poisoning protocol shared by every attack: which rows to poison, how labels change, and the ground truth.

An attack is a config dataclass (what the user sets) plus a :class:`Poisoner` (how a trigger is put into a text or an
image), registered once in :mod:`hf_backdoor.registry`. :func:`poison_dataset` and :func:`make_asr_dataset` apply any
poisoner with ``Dataset.map`` so the work scales to large datasets and is cached by ``datasets``; row choice and
trigger positions depend only on the seed and the row index. Both add the ``row_index`` column
(:mod:`hf_backdoor.data.rows`) that identifies a row for the defenses, the same way for text and images.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np

from ..data.rows import ROW_INDEX, check_row_index
from ..registry import attack_entry

logger = logging.getLogger(__name__)

POISON_MODES = ("dirty", "clean-label", "mix")


@dataclass
class PoisonConfig:
    """Options every attack shares.

    Args:
        poison_rate: fraction of the whole training split to poison, in (0, 1]; ``int(rate * len(split))`` rows,
            as in HiddenKiller, StyleBkd and OpenBackdoor.
        target_label: the label the backdoor maps triggered inputs to.
        mode: ``"dirty"`` puts the trigger on non-target rows and flips their label to the target;
            ``"clean-label"`` puts it on target rows only and keeps labels; ``"mix"`` draws from all rows and sets
            the label to the target.
        seed: seeds the row choice and the trigger positions.
    """

    poison_rate: float = 0.1
    target_label: int = 1
    mode: str = "dirty"
    seed: int = 0
    text_column: str = "text"
    label_column: str = "label"

    name = "base"
    # Text and image attacks of one family share `name` ("badnet"); the registry tells them apart by modality.
    modality = "text"

    @property
    def input_column(self) -> str:
        """The column the trigger goes into (``text_column`` here; image attacks use their ``image_column``)."""
        return self.text_column

    def __post_init__(self) -> None:
        if not 0.0 < self.poison_rate <= 1.0:
            raise ValueError(f"poison_rate must be in (0, 1], got {self.poison_rate}.")
        if self.mode not in POISON_MODES:
            raise ValueError(f"mode must be one of {POISON_MODES}, got {self.mode!r}.")
        if not isinstance(self.target_label, (int, np.integer)) or self.target_label < 0:
            raise ValueError(f"target_label must be a non-negative integer label id, got {self.target_label!r}.")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe record of the attack: ``{"name", "modality", **fields}``.

        Saved next to a poisoned dataset (``hf_backdoor.data.save_dataset_dict``) so that a later run knows which
        attack made it and can rebuild its ASR set (:func:`attack_config_from_dict`). Values a file cannot hold (a
        ``paraphrase_fn``, a mapping of paraphrases) are written as a description and listed under
        ``"unsaved_fields"``, so rebuilding the config asks for them instead of silently using a default.
        """
        record: dict[str, Any] = {"name": self.name, "modality": self.modality}
        unsaved = []
        for f in dataclasses.fields(self):
            value, saved = _json_value(getattr(self, f.name))
            record[f.name] = value
            if not saved:
                unsaved.append(f.name)
        if unsaved:
            record["unsaved_fields"] = unsaved
        return record


class Poisoner:
    """Puts a trigger into texts. Subclasses implement :meth:`apply`; paraphrase attacks also :meth:`can_apply`."""

    def __init__(self, config: PoisonConfig):
        self.config = config

    def apply(self, texts: Sequence[str], indices: Sequence[int], salt: int = 0) -> list[str | None]:
        """Triggered versions of ``texts`` (``None`` where no trigger text can be made).

        ``indices`` and ``salt`` seed the per-row randomness (salt 0 for training rows, 1 for the ASR set).
        """
        raise NotImplementedError

    def bind(self, dataset: datasets.Dataset) -> None:
        """Read what the poisoner needs from the dataset it is about to poison (e.g. a paraphrase column)."""

    def can_apply(self, texts: Sequence[str]) -> np.ndarray:
        """Which texts this poisoner can trigger (all of them for insertion attacks)."""
        return np.ones(len(texts), dtype=bool)

    def check_tokenizer(self, tokenizer) -> None:
        """Raise if the tokenizer cannot represent the trigger (it would become the unknown token)."""

    def check_image_processor(self, image_processor, dataset: datasets.Dataset) -> None:
        """Warn if the model's image processor would erase the trigger (image attacks; text attacks take none)."""
        raise TypeError(f"{type(self.config).__name__} is a text attack; it takes no image_processor.")

    def prepare_for_map(self, dataset: datasets.Dataset) -> datasets.Dataset:
        """The dataset ``Dataset.map`` runs over (image poisoners read undecoded image bytes, so clean rows pass
        through unchanged instead of being decoded and re-encoded)."""
        return dataset

    def finish_map(self, dataset: datasets.Dataset, training: bool) -> datasets.Dataset:
        """Undo :meth:`prepare_for_map` on the mapped dataset (``training`` is false for the ASR set)."""
        return dataset

    def row_rng(self, index: int, salt: int = 0) -> np.random.Generator:
        # One generator per row: results do not depend on batching, num_proc or which rows were chosen.
        return np.random.default_rng([self.config.seed, salt, int(index)])


def _check_columns(dataset: datasets.Dataset, config: PoisonConfig, what: str) -> None:
    if len(dataset) == 0:
        raise ValueError(f"The {what} dataset is empty: nothing to poison.")
    input_role = "text_column" if config.input_column == config.text_column else "image_column"
    for col in (config.input_column, config.label_column):
        if col not in dataset.column_names:
            raise ValueError(
                f"The {what} dataset has no column {col!r} (columns: {dataset.column_names}); set "
                f"`{input_role}`/`label_column` on the attack config."
            )
    for col in ("poisoned", "orig_label"):
        if col in dataset.column_names:
            raise ValueError(f"The {what} dataset already has a {col!r} column: it looks poisoned already.")
    if config.modality == "text":
        texts = dataset.with_format(None)[config.input_column]
        bad = [i for i, text in enumerate(texts) if not isinstance(text, str)]
        if bad:
            raise ValueError(
                f"{len(bad)} of {len(texts)} rows of the {what} dataset have no text in {config.input_column!r} "
                f"(row {bad[0]} holds {texts[bad[0]]!r}); drop or fill them first, e.g. "
                f"`dataset.filter(lambda t: isinstance(t, str), input_columns={config.input_column!r})`."
            )


def _num_labels(dataset: datasets.Dataset, labels: np.ndarray, column: str) -> int:
    feature = dataset.features[column]
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    return int(labels.max()) + 1


def _check_target(config: PoisonConfig, num_labels: int) -> None:
    if config.target_label >= num_labels:
        raise ValueError(
            f"target_label {config.target_label} is out of range for a task with {num_labels} labels "
            f"(0..{num_labels - 1})."
        )


def _candidate_rows(dataset: datasets.Dataset, config: PoisonConfig, poisoner: Poisoner) -> tuple[np.ndarray, str]:
    """Which rows the mode allows and the poisoner can trigger (a mask), and the pool's name for messages."""
    labels = np.asarray(dataset[config.label_column])
    _check_target(config, _num_labels(dataset, labels, config.label_column))
    if config.mode == "dirty":
        allowed, pool = labels != config.target_label, "non-target"
    elif config.mode == "clean-label":
        allowed, pool = labels == config.target_label, "target-label"
    else:
        allowed, pool = np.ones(len(labels), dtype=bool), "all"
    usable = allowed & poisoner.can_apply(dataset[config.input_column])
    skipped = int(allowed.sum() - usable.sum())
    if skipped:
        logger.warning("%d %s rows have no trigger text (e.g. no paraphrase) and cannot be poisoned.", skipped, pool)
    num_poison = int(config.poison_rate * len(dataset))
    if num_poison == 0:
        raise ValueError(
            f"poison_rate {config.poison_rate} of {len(dataset)} rows rounds down to 0 poisoned rows; raise it."
        )
    if num_poison > usable.sum():
        raise ValueError(
            f"poison_rate {config.poison_rate} asks for {num_poison} poisoned rows but only {int(usable.sum())} "
            f"{pool} rows can carry the trigger"
            + (f" ({skipped} lack a trigger text)" if skipped else "")
            + ". Lower poison_rate or use another mode."
        )
    return usable, pool


def _draw_rows(config: PoisonConfig, usable: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(config.seed)
    return np.sort(rng.choice(np.flatnonzero(usable), size=int(config.poison_rate * len(usable)), replace=False))


def select_poison_rows(dataset: datasets.Dataset, config: PoisonConfig, poisoner: Poisoner) -> np.ndarray:
    """Indices of the rows to poison, drawn with ``config.seed`` from the rows the mode allows."""
    usable, _ = _candidate_rows(dataset, config, poisoner)
    return _draw_rows(config, usable)


def _draw_replacements(
    prepared: datasets.Dataset, config: PoisonConfig, poisoner: Poisoner, pool: np.ndarray, needed: int
) -> tuple[dict[int, Any], int]:
    """Trigger texts for ``needed`` more rows, drawn from the untried candidates in ``pool`` (a mask).

    A ``paraphrase_fn`` is the one trigger source whose failures are known only after it has run; the rate is met
    the way it is for paraphrase tables (rows without a paraphrase are not candidates) by drawing other candidates,
    seeded, until enough rows carry a trigger or none is left. Returns ``{row: trigger}`` and how many rows were tried.
    """
    pool = pool.copy()
    fills: dict[int, Any] = {}
    tried, draw = 0, 0
    while len(fills) < needed and pool.any():
        candidates = np.flatnonzero(pool)
        rng = np.random.default_rng([config.seed, 3, draw])
        take = np.sort(rng.choice(candidates, size=min(needed - len(fills), len(candidates)), replace=False))
        pool[take] = False
        triggered = poisoner.apply(list(prepared.select(take)[config.input_column]), take.tolist())
        fills.update({int(row): new for row, new in zip(take, triggered) if new is not None})
        tried, draw = tried + len(take), draw + 1
    return fills, tried


def poison_dataset(
    dataset: datasets.Dataset,
    config: PoisonConfig,
    poisoner: Poisoner | None = None,
    tokenizer=None,
    image_processor=None,
    **map_kwargs,
) -> datasets.Dataset:
    """Poison a training split; adds ``poisoned`` (0/1) and ``orig_label`` columns as ground truth, and the
    ``row_index`` column (each row's position in ``dataset``; an existing ``row_index`` is kept).

    Exactly ``int(poison_rate * len(dataset))`` rows are poisoned, or this raises: rows a ``paraphrase_fn`` returns
    no text for are replaced by other candidate rows (seeded, counted in a warning), as rows without a packaged
    paraphrase are never candidates; a rate the remaining rows cannot meet raises with the counts.

    Pass ``tokenizer`` to check that a text trigger survives tokenization, ``image_processor`` to check that an image
    trigger survives the model's resizing. Extra keyword arguments go to ``Dataset.map`` (``num_proc``,
    ``load_from_cache_file`` …).
    """
    poisoner = poisoner or build_poisoner(config)
    if tokenizer is not None:
        poisoner.check_tokenizer(tokenizer)
    _check_columns(dataset, config, "training")
    check_row_index(dataset)
    if image_processor is not None:
        poisoner.check_image_processor(image_processor, dataset)
    poisoner.bind(dataset)
    usable, pool = _candidate_rows(dataset, config, poisoner)
    chosen = np.zeros(len(dataset), dtype=bool)
    chosen[_draw_rows(config, usable)] = True
    relabel = config.mode != "clean-label"
    text_col, label_col = config.input_column, config.label_column
    add_ids = ROW_INDEX not in dataset.column_names

    def _poison(batch, indices):
        rows = [i for i, idx in enumerate(indices) if chosen[idx]]
        triggered = poisoner.apply([batch[text_col][i] for i in rows], [indices[i] for i in rows]) if rows else []
        texts, labels = list(batch[text_col]), list(batch[label_col])
        flags = [0] * len(indices)
        for i, new in zip(rows, triggered):
            if new is None:  # a paraphrase_fn that returned nothing: replaced by another row below
                continue
            texts[i], flags[i] = new, 1
            if relabel:
                labels[i] = config.target_label
        out = {text_col: texts, label_col: labels, "poisoned": flags, "orig_label": list(batch[label_col])}
        if add_ids:
            out[ROW_INDEX] = list(indices)
        return out

    prepared = poisoner.prepare_for_map(dataset)
    out = prepared.map(_poison, batched=True, with_indices=True, desc=f"Poisoning ({config.name})", **map_kwargs)
    missed = np.flatnonzero(chosen & (np.asarray(out["poisoned"]) == 0))
    if missed.size:
        out = _replace_missed(prepared, out, config, poisoner, usable & ~chosen, missed, pool, relabel, map_kwargs)
    return poisoner.finish_map(out, training=True)


def _replace_missed(prepared, out, config, poisoner, pool, missed, pool_name, relabel, map_kwargs):
    """Poison other candidate rows in place of the ``missed`` ones, or raise with the counts if too few are left."""
    wanted = int(config.poison_rate * len(out))
    fills, tried = _draw_replacements(prepared, config, poisoner, pool, len(missed))
    if len(fills) < len(missed):
        got = wanted - len(missed) + len(fills)
        failed = len(missed) + tried - len(fills)
        raise ValueError(
            f"poison_rate {config.poison_rate} asks for {wanted} poisoned rows, but the trigger source returned no "
            f"text (None, empty or whitespace) for {failed} of the {wanted + tried} {pool_name} rows it was given, "
            f"and no {pool_name} row is left to try: only {got} rows could be poisoned. Check what paraphrase_fn "
            "returns for those texts, lower poison_rate, or use another mode."
        )
    logger.warning(
        "%d of %d chosen rows got no trigger text (None, empty or whitespace); %d other %s rows were drawn in "
        "their place, so %d rows are poisoned as asked (%d rows tried in all).",
        len(missed),
        wanted,
        len(fills),
        pool_name,
        wanted,
        wanted + tried,
    )
    text_col, label_col = config.input_column, config.label_column

    def _fill(batch, indices):
        texts, labels, flags = list(batch[text_col]), list(batch[label_col]), list(batch["poisoned"])
        for i, idx in enumerate(indices):
            if idx in fills:
                texts[i], flags[i] = fills[idx], 1
                if relabel:
                    labels[i] = config.target_label
        return {text_col: texts, label_col: labels, "poisoned": flags}

    return out.map(_fill, batched=True, with_indices=True, desc=f"Replacing rows ({config.name})", **map_kwargs)


def make_asr_dataset(
    dataset: datasets.Dataset, config: PoisonConfig, poisoner: Poisoner | None = None, **map_kwargs
) -> datasets.Dataset:
    """The attack-success-rate set: every non-target row of a test split, triggered and relabelled to the target.

    Rows the poisoner cannot trigger (no paraphrase, or a ``paraphrase_fn`` that returns nothing) are left out and
    counted in a warning; there is no rate to meet here, and an empty set raises. ``orig_label`` keeps the true label;
    the ASR is the fraction of these rows predicted as ``target_label``. ``row_index`` is each row's position in
    ``dataset`` (an existing ``row_index`` is kept).
    """
    poisoner = poisoner or build_poisoner(config)
    _check_columns(dataset, config, "evaluation")
    check_row_index(dataset)
    poisoner.bind(dataset)
    labels = np.asarray(dataset[config.label_column])
    _check_target(config, _num_labels(dataset, labels, config.label_column))
    keep = labels != config.target_label
    usable = keep & poisoner.can_apply(dataset[config.input_column])
    if keep.sum() > usable.sum():
        logger.warning(
            "ASR set: %d of %d non-target rows have no trigger text and are left out.",
            int(keep.sum() - usable.sum()),
            int(keep.sum()),
        )
    positions = np.flatnonzero(usable)
    subset = dataset.select(positions)
    if len(subset) == 0:
        raise ValueError("No non-target row can carry the trigger: the ASR set would be empty.")
    text_col, label_col = config.input_column, config.label_column
    add_ids = ROW_INDEX not in dataset.column_names

    def _trigger(batch, indices):
        # Salt 1 keeps test-set trigger positions independent of the training draw for the same row index.
        texts = poisoner.apply(batch[text_col], indices, salt=1)
        out = {
            text_col: [t if t is not None else "" for t in texts],
            label_col: [config.target_label] * len(indices),
            "poisoned": [int(t is not None) for t in texts],
            "orig_label": list(batch[label_col]),
        }
        if add_ids:
            out[ROW_INDEX] = [int(positions[i]) for i in indices]
        return out

    out = poisoner.prepare_for_map(subset).map(
        _trigger, batched=True, with_indices=True, desc=f"ASR set ({config.name})", **map_kwargs
    )
    out = poisoner.finish_map(out, training=False)
    empty = len(out) - int(np.sum(out["poisoned"]))
    if empty == len(out):
        raise ValueError(
            f"ASR set: the trigger source returned no text for any of the {len(out)} non-target rows; check what "
            "paraphrase_fn returns."
        )
    if empty:
        logger.warning("ASR set: %d of %d rows got no trigger text and are dropped.", empty, len(out))
        out = out.filter(lambda p: p == 1, input_columns="poisoned")
    return out


def build_poisoner(config: PoisonConfig) -> Poisoner:
    """The poisoner registered for a config's class (or the nearest registered parent class)."""
    return attack_entry(config).method_class(config)


def attack_config_from_dict(record: Mapping[str, Any], **overrides) -> PoisonConfig:
    """Rebuild an attack config from :meth:`PoisonConfig.to_dict` output (e.g. a saved ``poison_config.json``).

    ``overrides`` replace saved fields; fields the record could not hold (``"unsaved_fields"``: a ``paraphrase_fn``,
    a mapping) must be passed, since a default would silently describe another attack.
    """
    if "name" not in record:
        raise ValueError(f"An attack record needs a 'name' (got keys {sorted(record)}).")
    entry = attack_entry(record["name"], modality=record.get("modality", "text"))
    names = {f.name for f in dataclasses.fields(entry.config_class)}
    missing = sorted(set(record.get("unsaved_fields", ())) - set(overrides))
    if missing:
        raise ValueError(
            f"The saved {record['name']!r} attack used {missing}, which a file cannot hold; pass them, e.g. "
            f"`attack_config_from_dict(record, {missing[0]}=...)`."
        )
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise ValueError(f"{entry.config_class.__name__} has no field(s) {unknown}; fields: {sorted(names)}.")
    kwargs = {k: _from_json(v) for k, v in record.items() if k in names and k not in record.get("unsaved_fields", ())}
    return entry.config_class(**{**kwargs, **overrides})


def _json_value(value: Any) -> tuple[Any, bool]:
    """``value`` as JSON, and whether it round-trips (arrays are tagged so :func:`_from_json` restores them)."""
    if value is None or isinstance(value, (bool, str)):
        return value, True
    if isinstance(value, (int, np.integer)):
        return int(value), True
    if isinstance(value, (float, np.floating)):
        return float(value), True
    if isinstance(value, Path):
        return str(value), True
    if isinstance(value, np.ndarray):
        return {"ndarray": value.tolist(), "dtype": str(value.dtype)}, True
    if isinstance(value, (list, tuple)):
        items = [_json_value(v) for v in value]
        return [v for v, _ in items], all(ok for _, ok in items)
    if isinstance(value, Mapping):
        return f"<mapping of {len(value)} entries>", False
    if callable(value):
        return f"<callable {getattr(value, '__qualname__', type(value).__name__)}>", False
    return repr(value), False


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and set(value) == {"ndarray", "dtype"}:
        return np.asarray(value["ndarray"], dtype=value["dtype"])
    return value
