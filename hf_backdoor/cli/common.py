"""What the subcommands share at run time: checking arguments before anything heavy loads, data and model loading
with errors that say what to fix, CACC/ASR measurement with its floor and warnings, and the output folder.

Every ``check_*`` function runs before a model or dataset is loaded, so a wrong argument fails in seconds.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..hub.evaluations import evaluation_warnings, floor_text
from ..hub.run_folder import clear_run_artefacts, is_run_folder
from .options import TRIGGERED_SPLIT, CommandError

# Files from which a tokenizer can be rebuilt (tokenizer_config.json alone cannot).
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
_LOCAL_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet", ".arrow")


def looks_local(name: str) -> bool:
    """Whether ``name`` can only mean a local path (not a task name or a Hub id)."""
    return (
        name.startswith((".", "/", "~"))
        or os.path.isabs(name)
        or name.count("/") > 1
        or "\\" in name
        or name.lower().endswith(_LOCAL_SUFFIXES)
    )


# ----------------------------------------------------------------------------------------------------- datasets
@dataclass
class DatasetSource:
    """What ``--dataset`` names, found out without loading it."""

    name: str
    path: Path | None  # the local file or folder, if local
    saved: bool  # a `save_to_disk` folder (e.g. written by `hf-backdoor poison`)
    poison_info: dict[str, Any] | None  # its poison_config.json record

    @property
    def poisoned(self) -> bool:
        """Written by `hf-backdoor poison` (a poisoning record, or the triggered split of an older version)."""
        return self.poison_info is not None or (self.saved and (self.path / TRIGGERED_SPLIT).is_dir())

    @property
    def attack_name(self) -> str | None:
        return (self.poison_info or {}).get("attack", {}).get("name")

    @property
    def display_name(self) -> str:
        """The name cards and reports show: the task or Hub id (a poisoned folder's source task when recorded),
        else the local path (shown there as local files)."""
        from ..data import get_task_spec

        source = (self.poison_info or {}).get("source")
        name = source or self.name
        if self.path is None or source:
            try:
                return get_task_spec(name).name
            except ValueError:
                return name
        return str(self.path)


def check_dataset(name: str) -> DatasetSource:
    """Resolve ``--dataset`` without loading it; a path that does not exist fails here, naming the path."""
    from ..data.saving import load_poison_info

    path = Path(name).expanduser()
    if path.exists():
        saved = (path / "dataset_dict.json").is_file()
        return DatasetSource(name, path, saved, load_poison_info(path) if saved else None)
    if looks_local(name):
        raise CommandError(
            f"--dataset {name}: no such local file or folder ({path.resolve()}). Give an existing path, a packaged "
            "task or a Hub dataset id."
        )
    return DatasetSource(name, None, False, None)


def check_training_data(data_args, attack_args) -> tuple[DatasetSource, Any]:
    """``--dataset`` and the config of the ``--attack`` that poisons it (None without one), for a command that trains;
    a dataset `hf-backdoor poison` wrote cannot be poisoned again."""
    source = check_dataset(data_args.dataset)
    if attack_args.attack and source.poisoned:
        raise CommandError(
            f"--attack poisons the data, but {data_args.dataset} is poisoned already (written by `hf-backdoor poison`): drop --attack."
        )
    return source, attack_config(attack_args, source) if attack_args.attack else None


def check_saved_model_data(model_args, floor_args, data_args, trigger_args) -> DatasetSource:
    """The checks of a command that reads a saved model: --model (and --tokenizer), --floor-model, --dataset and the
    fields of --attack."""
    check_model(model_args.model, need_tokenizer=model_args.tokenizer is None)
    if model_args.tokenizer:
        check_tokenizer(model_args.tokenizer, "--tokenizer")
    check_model(floor_args.floor_model, "--floor-model")
    source = check_dataset(data_args.dataset)
    if trigger_args.attack:
        attack_config(trigger_args, source)  # a wrong field fails before anything loads
    return source


def load_data(data_args, source: DatasetSource, needed_split: str | None = None):
    """The ``DatasetDict`` ``--dataset`` names, with the seeded slices the arguments ask for; a command that cannot
    run without ``needed_split`` fails here when it is missing."""
    import datasets

    from ..data import add_row_index, load_task

    if source.saved:
        data = datasets.load_from_disk(str(source.path))
    else:
        try:
            data = load_task(source.name, text_column=data_args.text_column, label_column=data_args.label_column)
        except ConnectionError as error:
            raise CommandError(
                f"{error} (No local file or folder named {source.name!r} exists in {Path.cwd()} either.)"
            ) from None
    data = datasets.DatasetDict(data)
    if "test" in data:
        # Row ids before any slice: triggered rows made from the test split name their clean rows by them, so the
        # model's reading of those rows without the trigger can be measured (``asr_untriggered``).
        data["test"] = add_row_index(data["test"])
    max_train = getattr(data_args, "max_train_samples", None)
    limits = {"train": max_train, "test": data_args.max_eval_samples, TRIGGERED_SPLIT: data_args.max_eval_samples}
    for split, limit in limits.items():
        if limit and split in data:
            data[split] = data[split].shuffle(seed=data_args.seed).select(range(min(limit, len(data[split]))))
    if needed_split is not None and needed_split not in data:
        raise CommandError(f"The dataset has no `{needed_split}` split (splits: {sorted(data)}).")
    return data


def label_names(data) -> list[str]:
    split = data["train"] if "train" in data else next(iter(data.values()))
    feature = split.features["label"]
    if hasattr(feature, "names"):
        return list(feature.names)
    return [str(i) for i in range(int(max(split["label"])) + 1)]


def attack_config(trigger_args, source: DatasetSource):
    """The attack config the arguments describe, for the task ``--dataset`` names (its usual target label)."""
    from ..data import attack_for_task

    task = source.display_name
    config = attack_for_task(
        trigger_args.attack,
        task,
        poison_rate=getattr(trigger_args, "poison_rate", 0.1),  # the ASR set poisons no training rows
        target_label=trigger_args.target_label,
        mode=getattr(trigger_args, "mode", "dirty"),
        seed=getattr(trigger_args, "seed", 0),
    )
    fields = dict(trigger_args.attack_fields)
    names = {f.name for f in dataclasses.fields(config)}
    if trigger_args.triggers:
        if "triggers" not in names:
            raise CommandError(f"--triggers: the {config.name} attack takes no trigger words; see --attack-kwargs.")
        fields["triggers"] = tuple(t.strip() for t in trigger_args.triggers.split(",") if t.strip())
    unknown = sorted(set(fields) - names)
    if unknown:
        raise CommandError(
            f"--attack-kwargs: {type(config).__name__} has no field(s) {unknown}; fields: {sorted(names)}."
        )
    return dataclasses.replace(config, **fields) if fields else config


# ------------------------------------------------------------------------------------------------------- models
def check_model(name: str | None, flag: str = "--model", need_tokenizer: bool = True) -> None:
    """Fail early, and say why, when ``name`` is a local path that does not hold a loadable model."""
    if name is None:
        return
    path = Path(name).expanduser()
    if not path.exists():
        if looks_local(name) or not re.match(r"^[\w.-]+(/[\w.-]+)?$", name):
            raise CommandError(f"{flag} {name} does not exist: give the output folder of a train run or a Hub id.")
        return  # a Hub id: loading says whether it exists
    if not path.is_dir() or not (path / "config.json").is_file():
        raise CommandError(
            f"{flag} {name} is not a model folder (no config.json): give the output folder of `hf-backdoor train` "
            "or a folder written by `save_pretrained`."
        )
    if need_tokenizer:
        check_tokenizer(name, flag)


def check_tokenizer(name: str, flag: str) -> None:
    path = Path(name).expanduser()
    if path.is_dir() and not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise CommandError(
            f"{flag} {name} has no tokenizer files (none of {', '.join(TOKENIZER_FILES)}): it was saved without its "
            "tokenizer. Pass --tokenizer <the base model or a folder with its tokenizer>, or save the tokenizer into "
            "the folder (`tokenizer.save_pretrained(folder)`)."
        )


def load_saved_classifier(model_name: str, tokenizer_name: str | None, num_labels: int, flag: str = "--model"):
    """A saved sequence classifier and its tokenizer, checked against the data (label count) and each other (every
    token id must have an embedding row)."""
    from transformers import AutoModelForSequenceClassification

    from ..models import load_text_tokenizer

    try:
        tokenizer = load_text_tokenizer(tokenizer_name or model_name)
        model = AutoModelForSequenceClassification.from_pretrained(model_name)
    except (OSError, ValueError) as error:
        raise CommandError(f"{flag} {model_name} could not be loaded as a sequence classifier: {error}") from None
    if model.config.num_labels != num_labels:
        raise CommandError(
            f"{flag} {model_name} has {model.config.num_labels} labels but the dataset has {num_labels}: evaluate it "
            "on the task it was trained for."
        )
    check_vocabulary(model, tokenizer, f"{flag} {model_name}")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def check_vocabulary(model, tokenizer, what: str) -> None:
    """Raise when the tokenizer makes ids the model has no embedding for (a tokenizer of another model)."""
    embeddings = model.get_input_embeddings()
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise CommandError(
            f"{what}: its tokenizer has {len(tokenizer)} tokens but the model embeds only {rows}; the tokenizer "
            "belongs to another model. Pass --tokenizer <the model's own tokenizer>."
        )


def prediction_trainer(model, tokenizer, batch_size: int):
    """A plain ``Trainer`` that only predicts (nothing is written)."""
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=os.path.join(tempfile.gettempdir(), "hf-backdoor-predict"),
        per_device_eval_batch_size=batch_size,
        report_to="none",
        disable_tqdm=True,
    )
    return Trainer(model=model, args=args, processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer))


def backdoor_safe_trainer(model, tokenizer, training_args, run_id: str, train=None, validation=None, defense=None):
    """The ``BackdoorSafeTrainer`` of a CLI run (tokenized splits; padding per batch), tied to the run folder's id."""
    from transformers import DataCollatorWithPadding

    from ..trainer import BackdoorSafeTrainer

    trainer = BackdoorSafeTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        # Clean held-out rows for defenses that check clean accuracy while they act; no evaluation loop runs.
        eval_dataset=validation,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        defense=defense,
    )
    trainer.run_id = run_id  # one id in run_info.json, the trainer's record and defense_report.json
    return trainer


# --------------------------------------------------------------------------------------------------- evaluation
def measure(trainer, clean, asr=None, num_labels: int | None = None) -> dict[str, Any]:
    """CACC on ``clean`` and ASR on ``asr`` (both tokenized), with what the warnings read: the label count, the
    most frequent clean label's share and the model's predicted-class shares on the clean rows; and
    ``asr_untriggered`` (as ``evaluate_backdoor``'s) where both carry row ids that match the triggered rows to their
    clean rows."""
    from ..metrics import attack_success_rate, clean_accuracy, predict_labels
    from ..metrics.evaluation import untriggered_positions

    labels = np.asarray(clean["label"])
    predictions = predict_labels(trainer, clean)
    num_labels = num_labels or int(max(labels.max(), predictions.max()) + 1)
    result: dict[str, Any] = {
        "cacc": clean_accuracy(predictions, labels),
        "asr": None,
        "asr_floor": None,
        "num_clean": len(clean),
        "num_asr": 0,
        "num_labels": num_labels,
        "majority_share": float(np.bincount(labels, minlength=num_labels).max() / len(labels)),
        "prediction_shares": [float(s) for s in np.bincount(predictions, minlength=num_labels) / len(predictions)],
    }
    if asr is not None:
        targets = np.unique(np.asarray(asr["label"]))
        if targets.size != 1:
            raise CommandError(
                f"The triggered rows carry several labels {targets.tolist()}; they must all be the target."
            )
        result["asr"] = attack_success_rate(predict_labels(trainer, asr), int(targets[0]))
        result["num_asr"] = len(asr)
        rows = untriggered_positions(clean, asr)  # the triggered rows' clean rows, where row ids match them
        if rows is not None:
            result["asr_untriggered"] = attack_success_rate(predictions[rows], int(targets[0]))
    return result


def measure_reference(
    path: str | None, flag: str, model_args, clean_raw, asr_raw, num_labels: int
) -> dict[str, Any] | None:
    """A saved reference model's CACC and ASR on the same rows: the clean model (its ASR is the floor) or the
    undefended one (the card's "before")."""
    if path is None:
        return None
    from ..models import tokenize_dataset

    model, tokenizer = load_saved_classifier(path, None, num_labels, flag)
    trainer = prediction_trainer(model, tokenizer, model_args.batch_size)
    result = measure(
        trainer,
        tokenize_dataset(clean_raw, tokenizer, model_args.max_length),
        tokenize_dataset(asr_raw, tokenizer, model_args.max_length) if asr_raw is not None else None,
        num_labels,
    )
    return {**result, "model": path}


def measure_floor(floor_args, model_args, clean_raw, asr_raw, num_labels: int) -> dict[str, Any] | None:
    """The clean reference model's CACC and ASR on the same rows (its ASR is the floor)."""
    if asr_raw is None:
        return None
    return measure_reference(floor_args.floor_model, "--floor-model", model_args, clean_raw, asr_raw, num_labels)


def with_floor(result: dict[str, Any], floor: dict[str, Any] | None) -> dict[str, Any]:
    if floor is None or result.get("asr") is None:
        return result
    return {**result, "asr_floor": floor["asr"], "floor_model": floor["model"]}


def evaluation_lines(name: str, result: dict[str, Any], attack: str | None, floor: dict | None = None) -> list[str]:
    """What the CLI prints for one evaluated model: CACC, ASR, the floor (or how to get it) and warnings."""
    asr = "not measured" if result.get("asr") is None else f"{result['asr']:.3f} on {result['num_asr']} triggered rows"
    what = f" ({attack})" if attack and result.get("asr") is not None else ""
    lines = [f"{name}: CACC {result['cacc']:.3f} on {result['num_clean']} clean rows; ASR {asr}{what}"]
    if result.get("asr") is None:
        lines.append("  no attack evaluated: pass --attack NAME to measure the ASR on triggered test rows")
    else:
        lines.append(f"  {floor_text(result)}")
        if floor is not None:
            lines.append(f"  the clean model {floor['model']}: CACC {floor['cacc']:.3f}")
            lines.extend(f"  warning (clean model): {w}" for w in evaluation_warnings(floor))
    lines.extend(f"  warning: {w}" for w in evaluation_warnings(result))
    return lines


# --------------------------------------------------------------------------------------------- output folders
def check_output_dir(path: str, overwrite: bool, flag: str = "--output-dir") -> None:
    """Refuse to write a run into a non-empty folder that holds something else than an earlier run."""
    folder = Path(path).expanduser()
    if folder.exists() and not folder.is_dir():
        raise CommandError(f"{flag} {path} is a file: give a folder.")
    if folder.is_dir() and any(folder.iterdir()) and not is_run_folder(folder) and not overwrite:
        raise CommandError(
            f"{flag} {path} is not empty and holds no earlier hf-backdoor run: the run would overwrite files there "
            "(README.md among them). Choose a new or empty folder, or pass --overwrite."
        )


def replace_earlier_run(path: str, saves_weights: bool = True) -> list[str]:
    """Remove what an earlier run left in ``path`` (report, card, figures, run record), so nothing of it is read as
    this run's, and say so; its weights are overwritten when this run saves (``saves_weights``)."""
    folder = Path(path).expanduser()
    removed = clear_run_artefacts(folder) if folder.is_dir() else []
    if removed:
        weights = "; its weights are overwritten" if saves_weights else ""
        print(f"{path} held an earlier run: removed its {', '.join(removed)}{weights}.")
    return removed


def check_push(push: bool, hub_model_id: str | None, output_dir: str) -> None:
    """Fail before training when a push cannot work: no repository id, or offline mode."""
    if not push:
        return
    if not hub_model_id:
        raise CommandError("--push-to-hub needs --hub-model-id (e.g. your-name/sst2-btu).")
    from huggingface_hub import constants

    if constants.is_offline_mode():
        raise CommandError(
            "--push-to-hub: offline mode is on (HF_HUB_OFFLINE=1). Run without --push-to-hub, then push the saved "
            f"folder from a machine with network access: `hf upload {hub_model_id} {output_dir}`."
        )
