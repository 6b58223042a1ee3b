"""Shared machinery of the paraphrase attacks (Syntactic, Style): where the trigger text comes from.

A paraphrase attack's trigger is a rewrite of the whole text. The rewrite comes from exactly one source:
a packaged table (the attack authors' released outputs, keyed by clean text), a file of ``text``/``paraphrase``
pairs, a column of the dataset being poisoned, or a callable ``paraphrase_fn(texts) -> texts`` (any model).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...data.tasks import TASKS, load_paraphrases, normalize_text, read_paraphrase_file
from ..base import PoisonConfig, Poisoner


@dataclass
class ParaphraseConfig(PoisonConfig):
    """Where paraphrases come from; set exactly one of the three.

    Args:
        paraphrases: a packaged task name (``"sst2"``, ``"hsol"`` …: the authors' released paraphrases), a path to a
            csv/tsv/json/parquet file with ``text`` and ``paraphrase`` columns, or a ``{text: paraphrase}`` mapping.
        paraphrase_column: a column of the dataset itself that holds each row's paraphrase.
        paraphrase_fn: a callable mapping a list of texts to their paraphrases (e.g. a text2text pipeline).
            A row it returns nothing for (None, empty or whitespace) cannot be poisoned: ``poison_dataset`` draws
            another candidate row in its place (counted in a warning) and raises when the rate cannot be met.
        paraphrase_batch_size: how many texts ``paraphrase_fn`` gets per call.
    """

    paraphrases: str | Mapping[str, str] | None = None
    paraphrase_column: str | None = None
    paraphrase_fn: Callable[[list[str]], list[str]] | None = None
    paraphrase_batch_size: int = 64

    kind = "paraphrase"

    def __post_init__(self) -> None:
        super().__post_init__()
        given = [x is not None for x in (self.paraphrases, self.paraphrase_column, self.paraphrase_fn)]
        if sum(given) != 1 and not self._has_backend():
            raise ValueError(
                f"{type(self).__name__} needs exactly one paraphrase source: `paraphrases=` (a packaged task name "
                "such as 'sst2', a file, or a mapping), `paraphrase_column=`, or `paraphrase_fn=`; "
                f"got {sum(given)}."
            )
        if self.paraphrase_fn is not None and not callable(self.paraphrase_fn):
            raise TypeError("paraphrase_fn must be callable: list[str] -> list[str].")
        if self.paraphrase_batch_size < 1:
            raise ValueError(f"paraphrase_batch_size must be >= 1, got {self.paraphrase_batch_size}.")

    def _has_backend(self) -> bool:
        return False


class ParaphrasePoisoner(Poisoner):
    config: ParaphraseConfig

    def __init__(self, config: ParaphraseConfig):
        super().__init__(config)
        self.table: dict[str, str] | None = None
        self.fn = config.paraphrase_fn
        if config.paraphrases is not None:
            self.table = self._load_table(config.paraphrases)

    def _load_table(self, source: str | Mapping[str, str]) -> dict[str, str]:
        if isinstance(source, Mapping):
            return {normalize_text(k): v for k, v in source.items() if _is_text(k) and _is_text(v)}
        if source.lower() in TASKS:
            return load_paraphrases(source, self.config.kind)
        if Path(source).exists():
            return read_paraphrase_file(source)
        raise ValueError(
            f"paraphrases={source!r} is neither a packaged task ({', '.join(TASKS)}) nor an existing file."
        )

    def bind(self, dataset) -> None:
        if self.config.paraphrase_column is not None:
            column = self.config.paraphrase_column
            if column not in dataset.column_names:
                raise ValueError(
                    f"paraphrase_column {column!r} is not a column of the dataset ({dataset.column_names})."
                )
            self.table = {
                normalize_text(t): p
                for t, p in zip(dataset[self.config.text_column], dataset[column])
                if _is_text(t) and _is_text(p)
            }

    def can_apply(self, texts: Sequence[str]) -> np.ndarray:
        if self.table is None:  # a callable: known only once it has run
            return np.ones(len(texts), dtype=bool)
        return np.fromiter(
            (_is_text(t) and normalize_text(t) in self.table for t in texts), dtype=bool, count=len(texts)
        )

    def apply(self, texts: Sequence[str], indices: Sequence[int], salt: int = 0) -> list[str | None]:
        if self.table is not None:
            return [self.table.get(normalize_text(t)) for t in texts]
        out: list[str | None] = []
        size = self.config.paraphrase_batch_size
        for start in range(0, len(texts), size):
            chunk = list(texts[start : start + size])
            result = list(self.fn(chunk))
            if len(result) != len(chunk):
                raise ValueError(f"paraphrase_fn returned {len(result)} texts for {len(chunk)} inputs.")
            out.extend(r if _is_text(r) else None for r in result)
        return out


def _is_text(value) -> bool:
    """A usable text or paraphrase: a string with something in it (not None, NaN, "" or whitespace)."""
    return isinstance(value, str) and bool(value.strip())
