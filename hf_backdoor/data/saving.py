"""Saving a (poisoned) dataset to a folder safely, with a record of the attack that made it.

:func:`save_dataset_dict` is what ``hf-backdoor poison --output-dir`` calls; :func:`load_poison_info` is how a later
``train --dataset <folder>`` learns which attack (name, rate, target, mode, seed…) the folder holds, so it can build
the matching ASR set and say in its report what it trained on.

What it guards against, each a real way to lose data:

- writing into its own input (``output_dir`` equal to, inside or above ``source_dir``, or holding the cache files the
  dataset is read from): the input would be overwritten or deleted while it is still being read;
- overwriting an existing non-empty folder by accident: refused unless ``overwrite=True``;
- an interrupted run (Ctrl-C, out of disk, a crash) leaving a half-written dataset that loads but is incomplete: the
  dataset is written to a temporary sibling folder and renamed into place only once complete.

A leaf of ``hf_backdoor``: it imports nothing from it. The attack config is duck-typed (anything with ``to_dict()``,
or a dict), so this module does not import the attacks.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import datasets

logger = logging.getLogger(__name__)

POISON_INFO_FILE = "poison_config.json"
POISON_INFO_FORMAT = 1


def _contains(parent: Path, child: Path) -> bool:
    return child == parent or parent in child.parents


def _check_not_own_input(dataset, output: Path, source_dir: str | os.PathLike | None) -> None:
    if source_dir is not None:
        source = Path(source_dir).expanduser().resolve()
        if _contains(output, source) or _contains(source, output):
            relation = "is" if output == source else ("contains" if _contains(output, source) else "is inside")
            raise ValueError(
                f"The output folder {output} {relation} the input {source}: writing there would overwrite or mix "
                "with the data being read. Choose an output folder outside the input."
            )
    splits = dataset.values() if isinstance(dataset, datasets.DatasetDict) else [dataset]
    for split in splits:
        for cache in split.cache_files:
            if _contains(output, Path(cache["filename"]).resolve()):
                raise ValueError(
                    f"The dataset is read from {cache['filename']}, inside the output folder {output}: saving there "
                    "would overwrite the files being read. Choose another output folder."
                )


def _poison_record(dataset, attack: Any) -> dict[str, Any]:
    if hasattr(attack, "to_dict"):
        attack = attack.to_dict()
    if not isinstance(attack, Mapping) or "name" not in attack:
        raise TypeError(
            "attack must be an attack config (hf_backdoor.BadNetConfig(...) etc.) or its to_dict() record with a "
            f"'name'; got {type(attack).__name__}."
        )
    splits = dataset if isinstance(dataset, datasets.DatasetDict) else {"train": dataset}
    counts = {}
    for name, split in splits.items():
        counts[name] = {"rows": len(split)}
        if "poisoned" in split.column_names:
            counts[name]["poisoned"] = int(sum(split.with_format(None)["poisoned"]))
    return {"format": POISON_INFO_FORMAT, "attack": dict(attack), "splits": counts}


def save_dataset_dict(
    dataset_dict: datasets.DatasetDict | datasets.Dataset,
    output_dir: str | os.PathLike,
    *,
    overwrite: bool = False,
    source_dir: str | os.PathLike | None = None,
    attack: Any = None,
    source: str | None = None,
) -> Path:
    """Save ``dataset_dict`` (``save_to_disk`` layout) to ``output_dir`` without ever leaving a partial dataset.

    Args:
        dataset_dict: a ``DatasetDict`` (or a single ``Dataset``).
        output_dir: the folder to create. An existing empty folder is used; an existing non-empty one is refused
            unless ``overwrite``; a file there is always refused.
        overwrite: replace an existing non-empty ``output_dir``. The old content is removed only after the new
            dataset is completely written.
        source_dir: the folder the data was read from, if any: the output may not be it, be inside it or contain it.
        attack: the attack config that poisoned the data (or its ``to_dict()``); written to
            ``output_dir/poison_config.json`` with the per-split row and poisoned counts, for
            :func:`load_poison_info`. ``None`` for clean data (no file is written).
        source: the packaged task or Hub dataset the rows came from (``"sst2"``), kept in the record so a model
            trained on the folder can name its data.

    Returns the resolved output folder. The dataset is written to a hidden temporary sibling folder first and renamed
    into place when complete; if anything fails, the temporary folder is removed and ``output_dir`` is as before.
    """
    output = Path(output_dir).expanduser().resolve()
    _check_not_own_input(dataset_dict, output, source_dir)
    if output.exists():
        if not output.is_dir():
            raise FileExistsError(f"{output} is a file; the dataset needs a folder. Choose another output path.")
        if any(output.iterdir()) and not overwrite:
            raise FileExistsError(
                f"{output} already exists and is not empty. Pass overwrite=True (CLI: --overwrite) to replace it, or "
                "choose another output folder."
            )
    record = _poison_record(dataset_dict, attack) if attack is not None else None
    if record is not None and source is not None:
        record["source"] = source
    output.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:8]
    tmp = output.parent / f".{output.name}.tmp-{tag}"
    old = output.parent / f".{output.name}.old-{tag}"
    try:
        dataset_dict.save_to_disk(str(tmp))
        if record is not None:
            (tmp / POISON_INFO_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if output.exists():
            output.rename(old)  # kept until the new folder is in place
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not output.exists():
            old.rename(output)  # put the previous content back
        raise
    shutil.rmtree(old, ignore_errors=True)
    logger.info("Saved the dataset to %s%s.", output, f" ({POISON_INFO_FILE} records the attack)" if record else "")
    return output


def load_poison_info(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The poisoning record :func:`save_dataset_dict` wrote into ``folder``, or ``None`` if it holds none (clean or
    foreign data).

    The record is ``{"format": 1, "attack": {"name", "modality", "poison_rate", "target_label", "mode", "seed", …},
    "splits": {split: {"rows", "poisoned"}}}``; ``hf_backdoor.attacks.attack_config_from_dict(record["attack"])``
    rebuilds the attack config from it. A record that cannot be read raises, naming the file.
    """
    path = Path(folder).expanduser() / POISON_INFO_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); delete it or save the dataset again.") from err
    if not isinstance(record, dict) or not isinstance(record.get("attack"), dict) or "name" not in record["attack"]:
        raise ValueError(f"{path} is not a poisoning record (it needs an 'attack' object with a 'name').")
    if record.get("format", POISON_INFO_FORMAT) > POISON_INFO_FORMAT:
        raise ValueError(
            f"{path} was written by a newer hf-backdoor (record format {record['format']}); upgrade hf-backdoor."
        )
    return record
