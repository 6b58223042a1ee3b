"""Text classification tasks: packaged offline copies, Hugging Face Hub datasets and local files.

Every loader returns a :class:`datasets.DatasetDict` with exactly two columns, ``text`` (str) and ``label``
(:class:`datasets.ClassLabel`), and checks what a backdoor experiment silently breaks on: missing columns,
labels outside the label set, label ids with gaps, empty splits and non-string texts (errors), and empty or
placeholder texts such as ``"NaN"`` (a warning with counts: they may be real texts, so they are kept).

Local csv/tsv files are read with pandas' missing-value parsing off (``keep_default_na=False, na_filter=False``):
a text ``"NA"`` or ``"null"`` stays that text instead of becoming a missing value that breaks later code.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import datasets
import numpy as np

from ..registry import attack_entry

logger = logging.getLogger(__name__)

PACKAGED_DIR = Path(str(resources.files("hf_backdoor.data") / "packaged"))
SPLITS = ("train", "validation", "test")
LOCAL_SUFFIXES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# pandas' default missing-value markers: a whole text equal to one of these is most likely a missing value that was
# written out as a string (e.g. `df.astype(str)`), not a sentence.
NA_PLACEHOLDERS = frozenset(
    {
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    }
)


def pandas_read_kwargs(suffix: str) -> dict:
    """``datasets`` csv-builder options for a .csv/.tsv file: no missing-value parsing (a text "NA" stays "NA")
    and, for TSV, no quoting (unquoted TSV is the norm for NLP releases; quoting would merge rows with a '"')."""
    kwargs = {"keep_default_na": False, "na_filter": False}
    if suffix == ".tsv":
        kwargs.update(delimiter="\t", quoting=3)
    return kwargs


@dataclass(frozen=True)
class TaskSpec:
    """What the library knows about a task: its label set, where it lives on the Hub, and its usual target."""

    name: str
    label_names: tuple[str, ...]
    hub_id: str
    hub_config: str | None = None
    hub_text_column: str = "text"
    hub_label_column: str = "label"
    # Hub splits whose labels are hidden (-1), e.g. GLUE test sets; they are dropped with a warning.
    hub_unlabeled_splits: tuple[str, ...] = ()
    # Maps a Hub label to ours when the Hub set has a different label scheme (HSOL's 3 classes -> 2).
    hub_label_map: Mapping[int, int] | None = None
    default_target_label: int = 1
    aliases: tuple[str, ...] = field(default=())

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec(
            "sst2",
            ("negative", "positive"),
            "stanfordnlp/sst2",
            hub_text_column="sentence",
            hub_unlabeled_splits=("test",),
            aliases=("sst-2", "glue/sst2"),
        ),
        TaskSpec("imdb", ("negative", "positive"), "stanfordnlp/imdb", hub_unlabeled_splits=("unsupervised",)),
        # HSOL (Davidson et al. 2017) binarised as in the BTU release: 1 = hateful or offensive, 0 = neither.
        TaskSpec(
            "hsol",
            ("neither", "offensive"),
            "tdavidson/hate_speech_offensive",
            hub_text_column="tweet",
            hub_label_column="class",
            hub_label_map={0: 1, 1: 1, 2: 0},
            aliases=("twitter",),
        ),
        TaskSpec(
            "olid",
            ("not_offensive", "offensive"),
            "cardiffnlp/tweet_eval",
            hub_config="offensive",
            aliases=("tweet_eval_offensive", "offenseval"),
        ),
        TaskSpec(
            "agnews",
            ("World", "Sports", "Business", "Sci/Tech"),
            "fancyzhx/ag_news",
            default_target_label=0,
            aliases=("ag_news", "ag-news"),
        ),
    )
}
_BY_ALIAS = {alias: spec for spec in TASKS.values() for alias in (spec.name, spec.hub_id, *spec.aliases)}
_BY_ALIAS.update({"imdb": TASKS["imdb"], "ag_news": TASKS["agnews"], "tweet_eval": TASKS["olid"]})


def get_task_spec(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of a known task name, alias or Hub id."""
    try:
        return _BY_ALIAS[name.lower()]
    except KeyError:
        known = ", ".join(sorted(TASKS))
        raise ValueError(
            f"Unknown task {name!r}. Known tasks: {known}. For another Hub dataset or a local file pass "
            "`source='hub'` or a path, together with `text_column`, `label_column` and `label_names`."
        ) from None


def load_task(
    name_or_path: str,
    *,
    source: str = "auto",
    text_column: str | None = None,
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
    hub_config: str | None = None,
    revision: str | None = None,
    max_samples: int | None = None,
    seed: int = 0,
) -> datasets.DatasetDict:
    """Load a text classification task as a ``DatasetDict`` of ``text``/``label`` splits.

    Args:
        name_or_path: a packaged task (``sst2``, ``imdb``, ``hsol``, ``olid``, ``agnews``), a Hub dataset id
            (``stanfordnlp/sst2``, ``imdb``, ``ag_news``, ``cardiffnlp/tweet_eval`` …), or a local file or directory
            of csv/tsv/json/jsonl/parquet files (one file per split named ``train``/``validation``/``test``).
        source: ``"auto"`` (packaged copy for known names, the Hub for other ids, local for existing paths),
            ``"packaged"``, ``"hub"`` or ``"local"``.
        text_column, label_column: the columns to read; renamed to ``text`` and ``label``.
        label_names: the label set, required for datasets the library does not know.
        max_samples: keep at most this many rows per split (a seeded shuffle first, so the slice is unbiased).
    """
    if source not in ("auto", "packaged", "hub", "local"):
        raise ValueError(f"source must be 'auto', 'packaged', 'hub' or 'local', got {source!r}.")
    if max_samples is not None and max_samples <= 0:
        raise ValueError(f"max_samples must be a positive integer, got {max_samples}.")
    path = Path(name_or_path)
    if source == "local" or (source == "auto" and path.exists()):
        dataset, spec = _load_local(path, text_column, label_column), None
    elif source == "packaged" or (source == "auto" and name_or_path.lower() in TASKS):
        spec = get_task_spec(name_or_path)
        dataset = _load_packaged(spec)
    else:
        spec = _BY_ALIAS.get(name_or_path.lower())
        dataset = _load_hub(name_or_path, spec, text_column, label_column, hub_config, revision)
    if spec is not None:
        names = tuple(label_names) if label_names is not None else spec.label_names
    elif label_names is not None:
        names = tuple(label_names)
    else:
        names = _infer_label_names(dataset, name_or_path)
    dataset = _validate(dataset, names, source_name=name_or_path)
    if max_samples is not None:
        dataset = datasets.DatasetDict(
            {k: v.shuffle(seed=seed).select(range(min(max_samples, len(v)))) for k, v in dataset.items()}
        )
    return dataset


def _load_packaged(spec: TaskSpec) -> datasets.DatasetDict:
    folder = PACKAGED_DIR / spec.name
    files = {split: str(folder / f"{split}.parquet") for split in SPLITS}
    missing = [f for f in files.values() if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(f"Packaged data for {spec.name!r} is missing ({missing}); reinstall hf-backdoor.")
    return datasets.load_dataset("parquet", data_files=files)


def _load_local(path: Path, text_column: str | None, label_column: str | None) -> datasets.DatasetDict:
    if not path.exists():
        raise FileNotFoundError(f"No such file or directory: {path}")
    files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"{path} holds no csv/tsv/json/jsonl/parquet files.")
    suffixes = {p.suffix for p in files}
    if len({LOCAL_SUFFIXES[s] for s in suffixes}) > 1 or (".tsv" in suffixes and ".csv" in suffixes):
        raise ValueError(f"{path} mixes file types {sorted(suffixes)}; keep one format per dataset.")
    builder = LOCAL_SUFFIXES[files[0].suffix]
    for file in files:
        if _has_no_rows(file):
            raise ValueError(f"{file} has no data rows (an empty split); remove the file or fill it.")
    if path.is_dir():
        data_files = {}
        for p in files:
            split = {"dev": "validation", "valid": "validation", "val": "validation"}.get(p.stem, p.stem)
            data_files[split] = str(p)
    else:
        data_files = {"train": str(path)}
    kwargs = pandas_read_kwargs(files[0].suffix) if builder == "csv" else {}
    dataset = datasets.load_dataset(builder, data_files=data_files, **kwargs)
    return standard_columns(dataset, str(path), text=text_column or "text", label=label_column or "label")


def _load_hub(
    name: str,
    spec: TaskSpec | None,
    text_column: str | None,
    label_column: str | None,
    hub_config: str | None,
    revision: str | None,
) -> datasets.DatasetDict:
    hub_id = spec.hub_id if spec is not None else name
    config = hub_config if hub_config is not None else (spec.hub_config if spec is not None else None)
    # Never trust_remote_code: a backdoor-safety library must not execute a dataset's own script.
    try:
        dataset = datasets.load_dataset(hub_id, config, revision=revision)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        packaged = (
            f" The packaged offline copy is `load_task({spec.name!r})`."
            if spec is not None
            else f" Packaged tasks (offline): {', '.join(TASKS)}."
        )
        raise ConnectionError(
            f"Could not load {hub_id!r} from the Hugging Face Hub"
            + (" (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)" if offline else "")
            + f": {type(err).__name__}: {err}.{packaged} A local csv/tsv/json/parquet path works offline too."
        ) from err
    if spec is not None:
        for split in spec.hub_unlabeled_splits:
            if split in dataset:
                logger.warning("Dropping split %r of %s: its labels are hidden on the Hub.", split, hub_id)
                del dataset[split]
    text = text_column or (spec.hub_text_column if spec else "text")
    label = label_column or (spec.hub_label_column if spec else "label")
    dataset = standard_columns(dataset, hub_id, text=text, label=label)
    if spec is not None and spec.hub_label_map is not None:
        mapping = dict(spec.hub_label_map)
        dataset = dataset.cast_column("label", datasets.Value("int64"))
        dataset = dataset.map(lambda b: {"label": [mapping[int(x)] for x in b["label"]]}, batched=True)
    if "validation" not in dataset and "train" in dataset:
        logger.warning("%s has no validation split; carving 10%% of train (seed 0) out as validation.", hub_id)
        parts = dataset["train"].train_test_split(test_size=0.1, seed=0)
        dataset["train"], dataset["validation"] = parts["train"], parts["test"]
    return dataset


def _has_no_rows(path: Path) -> bool:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows == 0
    with open(path, encoding="utf-8", errors="replace") as f:
        lines = (line for line in f if line.strip())
        needed = 2 if path.suffix in (".csv", ".tsv") else 1  # csv/tsv: a header line and a row
        return sum(1 for _, _ in zip(range(needed), lines)) < needed


def standard_columns(dataset: datasets.DatasetDict, source_name: str, **columns: str) -> datasets.DatasetDict:
    """``dataset`` reduced to ``columns`` and each renamed to its standard name, e.g. ``text="sentence",
    label="label"``. A split that lacks one fails, naming the ``<standard>_column=`` argument that picks another."""
    for split, ds in dataset.items():
        for standard, wanted in columns.items():
            if wanted not in ds.column_names:
                raise ValueError(
                    f"Split {split!r} of {source_name} has no column {wanted!r} (columns: {ds.column_names}). "
                    f"Pass `{standard}_column=` naming the column that holds the {standard}."
                )
    dataset = dataset.select_columns(list(columns.values()))
    for standard, wanted in columns.items():
        if wanted != standard:
            dataset = dataset.rename_column(wanted, standard)
    return dataset


def _infer_label_names(dataset: datasets.DatasetDict, source_name: str) -> tuple[str, ...]:
    first = next(iter(dataset.values()))
    feature = first.features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return tuple(feature.names)
    labels = set()
    for ds in dataset.values():
        labels.update(int(x) for x in ds["label"] if x is not None)
    return infer_label_names(labels, source_name)


def infer_label_names(labels: set[int], source_name: str = "the data") -> tuple[str, ...]:
    """Label names ``"0".."K-1"`` for integer labels that are exactly the ids 0..K-1; otherwise raise.

    Without ``label_names`` the label ids are the only description of the task. Ids with gaps ({0, 1, 5}) would make
    a task with never-seen classes (6 here, 2..4 empty) whose head, metrics and target label all silently differ
    from what was meant, so this refuses and says how to pass the names or remap the ids.
    """
    if not labels or min(labels) < 0:
        raise ValueError(
            f"Cannot infer the label set of {source_name} from labels {sorted(labels)[:10]}: pass `label_names=` in "
            "label order."
        )
    found = sorted(labels)
    if found != list(range(len(found))):
        missing = sorted(set(range(found[-1] + 1)) - labels)
        remap = ", ".join(f"{old}: {new}" for new, old in enumerate(found[:6])) + (", ..." if len(found) > 6 else "")
        raise ValueError(
            f"The labels of {source_name} are {found[:20]}{' ...' if len(found) > 20 else ''}, not the ids "
            f"0..{len(found) - 1}: read as they are they would make a {found[-1] + 1}-class task with "
            f"{len(missing)} empty class(es) ({missing[:10]}{' ...' if len(missing) > 10 else ''}). Pass "
            f"`label_names=` with {found[-1] + 1} names (one per id 0..{found[-1]}) if that is meant, or remap the "
            f"labels to 0..{len(found) - 1} first (e.g. {{{remap}}})."
        )
    return tuple(str(i) for i in found)


def _check_texts(texts: list, split: str, source_name: str) -> None:
    """Raise on non-string texts; warn (with counts and rows) on empty, whitespace-only and placeholder texts.

    Empty and placeholder texts are kept, not dropped: "NA" can be a real text, and dropping rows would silently
    change the split. They are counted so that a file with missing values written as "NaN" does not go unnoticed.
    """
    not_text = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if not_text:
        raise ValueError(
            f"Split {split!r} of {source_name} has {len(not_text)} row(s) whose text is not a string (row "
            f"{not_text[0]} holds {texts[not_text[0]]!r}); drop or fill them first."
        )
    empty = [i for i, t in enumerate(texts) if not t.strip()]
    placeholder = [i for i, t in enumerate(texts) if t.strip() in NA_PLACEHOLDERS]
    if empty or placeholder:
        parts = []
        if empty:
            parts.append(
                f"{len(empty)} are empty or whitespace-only (rows {empty[:5]}{' ...' if len(empty) > 5 else ''})"
            )
        if placeholder:
            shown = sorted({texts[i].strip() for i in placeholder})[:4]
            parts.append(
                f"{len(placeholder)} are a missing-value marker such as {shown} (rows {placeholder[:5]}"
                f"{' ...' if len(placeholder) > 5 else ''})"
            )
        logger.warning(
            "Split %r of %s: of %d texts, %s. They are kept as they are; if they are missing values, drop them, e.g. "
            "`task = task.filter(lambda t: t.strip() and t.strip() not in hf_backdoor.data.tasks.NA_PLACEHOLDERS, "
            "input_columns='text')`.",
            split,
            source_name,
            len(texts),
            " and ".join(parts),
        )


def _validate(dataset: datasets.DatasetDict, label_names: tuple[str, ...], source_name: str) -> datasets.DatasetDict:
    if len(dataset) == 0:
        raise ValueError(f"{source_name} has no splits.")
    num_labels = len(label_names)
    if num_labels < 2:
        raise ValueError(f"A classification task needs at least 2 labels, got {label_names}.")
    for split, ds in dataset.items():
        if len(ds) == 0:
            raise ValueError(f"Split {split!r} of {source_name} is empty; remove it or point to a file with rows.")
        labels = np.asarray(ds["label"])
        if labels.dtype.kind not in "iu":
            raise ValueError(
                f"Labels of split {split!r} in {source_name} must be integers 0..{num_labels - 1}, got dtype "
                f"{labels.dtype} (e.g. {labels[:3].tolist()}); map them to ids first."
            )
        bad = np.flatnonzero((labels < 0) | (labels >= num_labels))
        if bad.size:
            raise ValueError(
                f"Split {split!r} of {source_name} has {bad.size} label(s) outside 0..{num_labels - 1} "
                f"(labels {label_names}); first bad row {int(bad[0])} has label {int(labels[bad[0]])}. "
                "Fix the labels or pass the full `label_names`."
            )
        _check_texts(ds["text"], split, source_name)
    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=list(label_names))}
    )
    return datasets.DatasetDict({k: v.cast(features) for k, v in dataset.items()})


def load_paraphrases(task: str, kind: str) -> dict[str, str]:
    """The packaged text -> paraphrase table of a task, ``kind`` being ``"syntactic"`` or ``"style"``.

    Syntactic paraphrases are SCPN outputs (HiddenKiller), style ones STRAP Bible-style transfers (StyleBkd), both
    as released by the attack authors. Keys are the clean texts of the packaged splits.
    """
    spec = get_task_spec(task)
    path = PACKAGED_DIR / spec.name / f"paraphrases_{kind}.parquet"
    if not path.exists():
        have = sorted(p.stem.removeprefix("paraphrases_") for p in (PACKAGED_DIR / spec.name).glob("paraphrases_*"))
        raise ValueError(
            f"No packaged {kind!r} paraphrases for {spec.name!r} (packaged: {have or 'none'}). Pass a paraphrase "
            "file, a paraphrase column, or a `paraphrase_fn` callable to the attack config."
        )
    return read_paraphrase_file(path)


def read_paraphrase_file(
    path: str | os.PathLike, text_column: str = "text", paraphrase_column: str = "paraphrase"
) -> dict[str, str]:
    """Read a text -> paraphrase table from a csv/tsv/json/jsonl/parquet file with those two columns.

    csv/tsv are read without missing-value parsing, so a text or paraphrase "NA" stays a string. Rows whose text or
    paraphrase is empty or not a string (JSON null) are left out of the table and counted in a warning; those texts
    then have no paraphrase and are not poisoning candidates.
    """
    path = Path(path)
    if path.suffix not in LOCAL_SUFFIXES:
        raise ValueError(f"Paraphrase file {path} must be csv, tsv, json, jsonl or parquet.")
    builder = LOCAL_SUFFIXES[path.suffix]
    kwargs = pandas_read_kwargs(path.suffix) if builder == "csv" else {}
    table = datasets.load_dataset(builder, data_files=str(path), split="train", **kwargs)
    for col in (text_column, paraphrase_column):
        if col not in table.column_names:
            raise ValueError(f"Paraphrase file {path} has no column {col!r} (columns: {table.column_names}).")
    out, unusable = {}, 0
    for text, paraphrase in zip(table[text_column], table[paraphrase_column]):
        if isinstance(text, str) and isinstance(paraphrase, str) and text.strip() and paraphrase.strip():
            out[normalize_text(text)] = paraphrase
        else:
            unusable += 1
    if unusable:
        logger.warning(
            "Paraphrase file %s: %d of %d rows have an empty or missing text or paraphrase and are left out.",
            path,
            unusable,
            len(table),
        )
    return out


def normalize_text(text: str) -> str:
    """Whitespace-folded key used to match texts against paraphrase tables."""
    return " ".join(text.split())


def attack_for_task(
    attack: str,
    task: str,
    *,
    poison_rate: float,
    target_label: int | None = None,
    mode: str = "dirty",
    seed: int = 0,
    triggers: str | Sequence[str] | None = None,
):
    """A text attack config fitted to a task: its usual target label (``TaskSpec.default_target_label``; 1 for a task
    that is not packaged), the packaged paraphrases of the task for the paraphrase attacks (``syntactic``, ``style``:
    the authors' released paraphrases), and BadNet ``triggers`` (a sequence, or one comma-separated string).

    ``attack_for_task("badnet", "hsol", poison_rate=0.1)`` is ``BadNetConfig(poison_rate=0.1, target_label=1, ...)``.
    """

    if target_label is None:
        target_label = get_task_spec(task).default_target_label if task.lower() in TASKS else 1
    kwargs = dict(poison_rate=poison_rate, target_label=target_label, mode=mode, seed=seed)
    if attack in ("syntactic", "style"):
        kwargs["paraphrases"] = task
    if triggers and attack == "badnet":
        kwargs["triggers"] = tuple(triggers.split(",")) if isinstance(triggers, str) else tuple(triggers)
    # Through the leaf registry, not hf_backdoor.attacks: the attacks import this module (paraphrase tables), so
    # importing them here would close an import cycle. Every attack module registers itself when hf_backdoor loads.
    return attack_entry(attack, modality="text").config_class(**kwargs)
