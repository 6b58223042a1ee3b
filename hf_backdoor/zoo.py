"""A content-addressed cache of trained models (the "zoo"): each model is trained once per full training config.

Backdoor experiments train the same clean and backdoored models again and again (a floor model per dataset and seed,
the undefended model every defense is compared with, the model a repair starts from). :func:`train_or_load` trains
such a model once and reuses it::

    from hf_backdoor.zoo import ZooConfig, train_or_load

    config = ZooConfig(task="cifar10", model="vit-small-32", attack="badnet", attack_config=ImageBadNetsConfig(),
                       poison_rate=0.1, seed=0, epochs=20, learning_rate=1e-3, batch_size=128,
                       model_config={"patch_size": 8}, training={"crop_padding": 0, "weight_decay": 0.05})
    model_dir, run_info = train_or_load(config, train_fn)   # train_fn(config) -> a trained model or Trainer
    model = AutoModelForImageClassification.from_pretrained(model_dir)

How an entry is keyed and kept:

- The key is the sha256 of the canonical JSON (sorted keys, no whitespace) of the whole :class:`ZooConfig` plus this
  library's version, so any change of data, attack, seed, architecture or training makes a new entry, and a new
  release of hf-backdoor never reuses a model an older one trained. ``train_fn`` must read every setting that shapes
  the weights from the config: whatever it takes from elsewhere is not in the key.
- The cache directory is ``$HF_BACKDOOR_CACHE`` when set, else ``$XDG_CACHE_HOME/hf_backdoor/zoo`` (default
  ``~/.cache/hf_backdoor/zoo``). An entry is ``<cache>/<key>/``: the model's ``save_pretrained`` files (safetensors
  weights, its ``config.json``, the tokenizer or image processor when ``train_fn`` hands one back),
  ``zoo_config.json`` (the key, the library version and the config it was computed from; not ``config.json``, which
  is the model's) and ``run_info.json`` (training wall time, versions, what ``train_fn`` reported, and the size and
  sha256 of every file), so the entry is itself a model folder ``from_pretrained`` loads.
- An entry is written into a temporary folder and renamed into place, so a reader never sees half of one. On load it
  is checked, never trusted: the stored config must equal the requested one, every file listed in ``run_info.json``
  must be there with its size and (by default) its sha256, and every safetensors header must parse. A missing,
  incomplete or corrupt entry is moved aside and trained again, so the cache can only save time, never change a
  result.
- Two processes that miss the same entry at the same time both train it; the first to finish publishes it and the
  other uses that one and drops its own copy.
- :func:`train_or_load_many` fills a list of configs with a progress bar; stopped and started again, it trains only
  what is missing (each finished model is published as soon as it is trained). Resuming a single interrupted
  training is ``train_fn``'s business (``Trainer`` checkpoints).
- ``use_cache=False`` neither reads nor writes the cache: it trains into ``output_dir`` (default: a new temporary
  folder) and returns the same ``(model_dir, run_info)``.

``python -m hf_backdoor.zoo`` lists the entries (``--all`` adds unusable ones with the reason, ``--prune`` removes
them and abandoned temporary folders).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import importlib.metadata
import json
import logging
import math
import numbers
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .hub.run_folder import sha256_of_file as _sha256

logger = logging.getLogger(__name__)

CACHE_ENV_VAR = "HF_BACKDOOR_CACHE"
ZOO_CONFIG_FILE = "zoo_config.json"
RUN_INFO_FILE = "run_info.json"
# Bumped when the layout of an entry or the way the key is computed changes: older entries then no longer match.
ZOO_FORMAT = 1
_TEMP_PREFIX = ".tmp-"
_TRASH_PREFIX = ".trash-"
# A temporary folder exists only while a trained model is being saved (seconds); one older than this was abandoned.
_ABANDONED_AFTER_S = 3600.0
_NO_ATTACK = "none"


@dataclass
class ZooConfig:
    """Everything that shapes a trained model's weights; the cache key is computed from all of it.

    Numbers given as strings or ints where a float is expected are normalised (``epochs=3`` and ``epochs=3.0`` are
    the same entry); the dict fields are keyed as given, so write them the same way everywhere (an attack config's
    ``to_dict()`` does).
    """

    task: str = field(
        metadata={
            "help": "The training data: a task name ('sst2', 'cifar10'), a Hub id or a file, plus any slice taken "
            "(e.g. 'cifar10_32.npz[:5000]'). A local file that can change needs data_fingerprint too."
        }
    )
    model: str = field(
        metadata={
            "help": "The model trained: a Hub id or path it starts from, or the name of an architecture trained "
            "from scratch (its fields go in model_config)."
        }
    )
    epochs: float = field(metadata={"help": "Training epochs."})
    learning_rate: float = field(metadata={"help": "Peak learning rate."})
    batch_size: int = field(metadata={"help": "Training batch size per optimizer step (all devices together)."})
    attack: str = field(
        default=_NO_ATTACK, metadata={"help": "The attack's registered name ('badnet', 'blended', ...); 'none': clean."}
    )
    attack_config: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Every field of the attack config (an attack config object is turned into its to_dict()); "
            "empty for a clean model."
        },
    )
    poison_rate: float = field(default=0.0, metadata={"help": "Share of training rows poisoned (0 for 'none')."})
    seed: int = field(default=0, metadata={"help": "The training seed (initialisation, data order, augmentation)."})
    model_config: Mapping[str, Any] = field(
        default_factory=dict, metadata={"help": "Architecture overrides, e.g. {'patch_size': 8}."}
    )
    training: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Every other training setting that changes the weights: optimizer, weight decay, schedule, "
            "warm-up, label smoothing, augmentation, precision (bf16), max_length, sample limits ..."
        },
    )
    defense_config: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={"help": "A training-stage defense's to_dict() when the model was trained with one; empty: none."},
    )
    data_fingerprint: str | None = field(
        default=None,
        metadata={
            "help": "A hash of the training rows (e.g. datasets.Dataset._fingerprint) when the task name alone does "
            "not pin them down."
        },
    )

    def __post_init__(self) -> None:
        for name in ("task", "model", "attack"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise TypeError(f"ZooConfig.{name} must be a non-empty string, got {getattr(self, name)!r}.")
        number_fields = {"epochs": float, "learning_rate": float, "poison_rate": float, "seed": int, "batch_size": int}
        for name, kind in number_fields.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
                raise TypeError(f"ZooConfig.{name} must be a number, got {value!r}.")
            try:
                number = kind(value)
            except ValueError as err:
                raise TypeError(f"ZooConfig.{name} must be a number, got {value!r}.") from err
            if kind is int and float(value) != number:
                raise TypeError(f"ZooConfig.{name} must be an integer, got {value!r}.")
            setattr(self, name, number)
        if self.epochs <= 0 or self.learning_rate <= 0 or self.batch_size <= 0:
            raise ValueError(
                f"epochs, learning_rate and batch_size must be positive, got {self.epochs}, {self.learning_rate} and "
                f"{self.batch_size}."
            )
        for name in ("attack_config", "defense_config"):
            value = getattr(self, name)
            if hasattr(value, "to_dict") and not isinstance(value, Mapping):
                value = value.to_dict()
            if not isinstance(value, Mapping):
                raise TypeError(f"ZooConfig.{name} must be a dict (or a config with to_dict()), got {type(value)}.")
            if value.get("unsaved_fields"):
                raise ValueError(
                    f"ZooConfig.{name} has fields JSON cannot hold ({list(value['unsaved_fields'])}: a function or a "
                    "mapping), so the cache key cannot tell two such models apart. Describe them by something JSON "
                    "holds (a packaged name, a file path) or train with use_cache=False."
                )
            setattr(self, name, dict(value))
        for name in ("model_config", "training"):
            if not isinstance(getattr(self, name), Mapping):
                raise TypeError(f"ZooConfig.{name} must be a dict, got {type(getattr(self, name))}.")
            setattr(self, name, dict(getattr(self, name)))
        if self.attack == _NO_ATTACK:
            if self.poison_rate != 0.0 or self.attack_config:
                raise ValueError(
                    "attack='none' (a clean model) takes poison_rate=0 and no attack_config; name the attack to cache "
                    "a poisoned model."
                )
        elif not 0.0 < self.poison_rate <= 1.0:
            raise ValueError(f"poison_rate must be in (0, 1] for attack {self.attack!r}, got {self.poison_rate}.")
        stated = self.attack_config.get("poison_rate")
        if stated is not None and not math.isclose(float(stated), self.poison_rate):
            raise ValueError(
                f"attack_config says poison_rate={stated} but ZooConfig.poison_rate is {self.poison_rate}; make them "
                "equal."
            )
        self.to_dict()  # raises now, naming the field, if any value cannot be keyed

    def to_dict(self) -> dict[str, Any]:
        """The config as canonical JSON values (what the key is computed from and ``zoo_config.json`` stores)."""
        return {f.name: _json_value(getattr(self, f.name), f.name, finite=True) for f in dataclasses.fields(self)}

    def describe(self) -> str:
        """A one-line summary for logs and listings."""
        return _describe(self.to_dict())


@dataclass
class TrainedModel:
    """What ``train_fn`` may return when it has more than a model to hand back (a plain model, or a ``Trainer``
    whose ``model`` and ``processing_class`` are saved, also work).

    ``info`` is stored in ``run_info.json`` (JSON values: metrics, a defense report ...); an ``info["wall_s"]``
    replaces the measured wall time of ``train_fn`` as the entry's training time (e.g. ``trainer.train()`` alone,
    without data preparation).
    """

    model: Any
    processor: Any = None
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class ZooEntry:
    """One folder of the cache, as :func:`list_entries` reports it; ``problem`` is ``None`` for a usable entry."""

    key: str
    path: Path
    config: dict | None
    run_info: dict | None
    problem: str | None


def default_cache_dir() -> Path:
    """``$HF_BACKDOOR_CACHE``, else ``$XDG_CACHE_HOME/hf_backdoor/zoo``, else ``~/.cache/hf_backdoor/zoo``."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "hf_backdoor" / "zoo"


def library_version() -> str:
    """The hf-backdoor version that goes into every key (read from the already imported package rather than imported
    from it, so the package's ``__init__`` may import this module)."""
    package = sys.modules[__name__.rpartition(".")[0]]
    return getattr(package, "__version__", None) or importlib.metadata.version("hf-backdoor")


def config_key(config: ZooConfig) -> str:
    """The sha256 (hex) naming ``config``'s entry: canonical JSON of the config, the library version and the format."""
    return _key_of(ZOO_FORMAT, library_version(), config.to_dict())


def _key_of(zoo_format: Any, version: Any, config: Any) -> str:
    payload = {"zoo_format": zoo_format, "library_version": version, "config": config}
    return hashlib.sha256(_canonical_json(payload).encode("utf-8")).hexdigest()


def entry_path(config: ZooConfig, cache_dir: str | Path | None = None) -> Path:
    """Where ``config``'s entry lives (whether or not it exists yet)."""
    return _cache_root(cache_dir) / config_key(config)


def train_or_load(
    config: ZooConfig,
    train_fn: Callable[[ZooConfig], Any],
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    verify_checksums: bool = True,
    output_dir: str | Path | None = None,
) -> tuple[Path, dict]:
    """The folder of the model ``config`` describes and its run info, training it with ``train_fn`` when the cache
    has no usable copy.

    Args:
        config: the full training config (the cache key).
        train_fn: ``train_fn(config)`` trains a fresh model and returns it: a model with ``save_pretrained``, a
            ``transformers.Trainer`` (its model and ``processing_class`` are saved), or a :class:`TrainedModel`.
            A torch.compile wrapper is unwrapped; a PEFT model saves its adapter only (``merge_and_unload()`` first to
            cache the whole model).
        cache_dir: the cache folder (default: :func:`default_cache_dir`).
        use_cache: ``False`` trains without reading or writing the cache.
        verify_checksums: check every file's sha256 against ``run_info.json`` before reusing an entry (sizes and
            safetensors headers are always checked).
        output_dir: where ``use_cache=False`` saves the model (default: a new temporary folder, left for the caller).

    Returns:
        ``(model_dir, run_info)``; ``run_info["from_cache"]`` says whether the model was reused, and ``run_info["key"]``
        is the entry's key.
    """
    if not isinstance(config, ZooConfig):
        raise TypeError(f"config must be a ZooConfig, got {type(config).__name__}.")
    config = copy.deepcopy(config)  # the key's snapshot: whatever the caller or train_fn changes later
    key = config_key(config)
    if not use_cache:
        target = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="hf_backdoor_model_"))
        target.mkdir(parents=True, exist_ok=True)
        run_info = _train_into(target, config, key, train_fn)
        return target, {**run_info, "from_cache": False}
    if output_dir is not None:
        raise ValueError("output_dir is only for use_cache=False; a cached model lives in the cache folder.")
    root = _cache_root(cache_dir)
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(root)
    entry = root / key
    run_info, problem = _check_entry(entry, key, config.to_dict(), verify_checksums)
    if run_info is not None:
        logger.info("zoo: reusing %s (%s)", key[:12], config.describe())
        return entry, {**run_info, "from_cache": True}
    if entry.exists():
        _discard(entry, problem)
    logger.info("zoo: training %s (%s)", key[:12], config.describe())
    produced = _timed_train(train_fn, config)
    staging = root / f"{_TEMP_PREFIX}{key[:16]}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        run_info = _save_entry(staging, config, key, *produced)
        published = _publish(staging, entry, key, config.to_dict(), verify_checksums)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when the rename succeeded
    if not published:  # another process published the same entry first: use that copy, as later calls will
        run_info = _check_entry(entry, key, config.to_dict(), verify_checksums=False)[0]
    return entry, {**run_info, "from_cache": not published}


def train_or_load_many(
    configs: Iterable[ZooConfig],
    train_fn: Callable[[ZooConfig], Any],
    *,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    verify_checksums: bool = True,
    progress: bool = True,
    desc: str = "model zoo",
) -> list[tuple[Path, dict]]:
    """:func:`train_or_load` for each config in turn, with a progress bar that counts reused and trained models.

    Stopped and started again, it reuses every model already published and trains the rest.
    """
    from tqdm.auto import tqdm

    configs = list(configs)
    results, counts = [], {"reused": 0, "trained": 0}
    with tqdm(total=len(configs), desc=desc, unit="model", disable=not progress) as bar:
        for config in configs:
            bar.set_postfix_str(config.describe()[:60])
            model_dir, run_info = train_or_load(
                config, train_fn, cache_dir=cache_dir, use_cache=use_cache, verify_checksums=verify_checksums
            )
            counts["reused" if run_info["from_cache"] else "trained"] += 1
            results.append((model_dir, run_info))
            bar.update(1)
            bar.set_postfix(counts)
    return results


def list_entries(
    cache_dir: str | Path | None = None, *, include_unusable: bool = False, verify_checksums: bool = False
) -> list[ZooEntry]:
    """The cache's entries, oldest first; with ``include_unusable`` also the incomplete or corrupt ones (with the
    reason in ``problem``). Temporary folders of models being saved are never listed."""
    root = _cache_root(cache_dir)
    if not root.is_dir():
        return []
    entries = []
    for path in sorted(root.iterdir()):
        if not path.is_dir() or path.name.startswith((_TEMP_PREFIX, _TRASH_PREFIX)):
            continue
        config = _read_json(path / ZOO_CONFIG_FILE)
        stored = config.get("config") if isinstance(config, dict) else None
        run_info, problem = _check_entry(path, path.name, stored, verify_checksums)
        if problem is None or include_unusable:
            entries.append(ZooEntry(path.name, path, stored, run_info, problem))
    return sorted(entries, key=lambda e: ((e.run_info or {}).get("created", ""), e.key))


def prune(cache_dir: str | Path | None = None) -> list[Path]:
    """Remove unusable entries and abandoned temporary folders; returns what was removed."""
    root = _cache_root(cache_dir)
    removed = [e.path for e in list_entries(root, include_unusable=True) if e.problem is not None]
    for path in removed:
        shutil.rmtree(path, ignore_errors=True)
    return removed + _remove_abandoned(root)


# --- internals -----------------------------------------------------------------------------------------------------


def _cache_root(cache_dir: str | Path | None) -> Path:
    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def _json_value(value: Any, where: str, finite: bool) -> Any:
    """``value`` as plain JSON values, or a ``ValueError`` naming the field that JSON cannot hold. ``finite``
    rejects NaN and infinities (a key must not depend on how they are spelt)."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if finite and not math.isfinite(value):
            raise ValueError(f"{where} is {value}: a cache key needs finite numbers.")
        return float(value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "item") and getattr(value, "shape", None) == ():  # numpy / torch scalars
        return _json_value(value.item(), where, finite)
    if hasattr(value, "tolist"):  # numpy arrays (e.g. a BadNets pattern)
        return _json_value(value.tolist(), where, finite)
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where} has a non-string key {k!r}; JSON keys are strings.")
            out[k] = _json_value(v, f"{where}.{k}", finite)
        return out
    if isinstance(value, (list, tuple)):
        return [_json_value(v, f"{where}[{i}]", finite) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        as_dict = value.to_dict() if hasattr(value, "to_dict") else dataclasses.asdict(value)
        return _json_value(as_dict, where, finite)
    kind = "a function" if callable(value) else type(value).__name__
    raise ValueError(
        f"{where} is {kind} ({value!r:.80}), which JSON cannot hold, so the cache key cannot describe it. Pass "
        "something JSON holds (a name, a path, numbers) or train with use_cache=False."
    )


def _canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def _describe(config: Mapping[str, Any]) -> str:
    attack = config.get("attack", "?")
    what = "clean" if attack == _NO_ATTACK else f"{attack} {config.get('poison_rate', 0):g}"
    extras = ", ".join(f"{k}={v}" for k, v in sorted((config.get("model_config") or {}).items()))
    return (
        f"{config.get('task')} {what} seed {config.get('seed')} | {config.get('model')}"
        + (f" ({extras})" if extras else "")
        + f" | {config.get('epochs', 0):g} ep, lr {config.get('learning_rate')}, batch {config.get('batch_size')}"
    )


def _timed_train(train_fn: Callable[[ZooConfig], Any], config: ZooConfig) -> tuple[Any, Any, dict, float]:
    start = time.perf_counter()
    produced = train_fn(copy.deepcopy(config))
    wall = time.perf_counter() - start
    if isinstance(produced, TrainedModel):
        return produced.model, produced.processor, dict(produced.info), wall
    if hasattr(produced, "save_pretrained"):
        return produced, None, {}, wall
    if hasattr(produced, "model") and hasattr(produced, "save_model"):  # a transformers.Trainer
        return produced.model, getattr(produced, "processing_class", None), {}, wall
    raise TypeError(
        f"train_fn returned {type(produced).__name__}; return the trained model (with save_pretrained), the Trainer "
        "that trained it, or hf_backdoor.zoo.TrainedModel(model, processor, info)."
    )


def _train_into(folder: Path, config: ZooConfig, key: str, train_fn) -> dict:
    return _save_entry(folder, config, key, *_timed_train(train_fn, config))


def _save_entry(folder: Path, config: ZooConfig, key: str, model, processor, info: dict, wall: float) -> dict:
    """Write the model, ``zoo_config.json`` and, last, ``run_info.json`` with the manifest of every file."""
    import torch
    import transformers

    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    model.save_pretrained(folder)
    if processor is not None:
        processor.save_pretrained(folder)
    if not any(folder.rglob("*.safetensors")):
        raise RuntimeError(
            f"{type(model).__name__}.save_pretrained wrote no .safetensors file in {folder}; the zoo stores weights as "
            "safetensors only (never pickles)."
        )
    (folder / ZOO_CONFIG_FILE).write_text(
        json.dumps(
            {"key": key, "zoo_format": ZOO_FORMAT, "library_version": library_version(), "config": config.to_dict()},
            indent=1,
            sort_keys=True,
        )
        + "\n"
    )
    info = _json_value(info, "train_fn's info", finite=False)
    run_info = {
        "key": key,
        "description": config.describe(),
        "created": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        # `wall_s` and `epochs` are what benchmarks.common.runs.saved_training_wall reads beside a saved model.
        "wall_s": float(info.get("wall_s", wall)),
        "train_fn_wall_s": wall,
        "epochs": config.epochs,
        "versions": {
            "hf_backdoor": library_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
        },
        "host": platform.node(),
        "info": info,
        "files": _manifest(folder),
    }
    (folder / RUN_INFO_FILE).write_text(json.dumps(run_info, indent=1) + "\n")
    return run_info


def _manifest(folder: Path) -> dict[str, dict]:
    return {
        path.relative_to(folder).as_posix(): {"size": path.stat().st_size, "sha256": _sha256(path)}
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name != RUN_INFO_FILE
    }


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _check_entry(entry: Path, key: str, config: dict | None, verify_checksums: bool) -> tuple[dict | None, str | None]:
    """``(run_info, None)`` for a usable entry, else ``(None, why not)``."""
    if not entry.is_dir():
        return None, "missing"
    stored = _read_json(entry / ZOO_CONFIG_FILE)
    if not isinstance(stored, dict):
        return None, f"no readable {ZOO_CONFIG_FILE} (an incomplete entry)"
    if stored.get("key") != key or stored.get("zoo_format") != ZOO_FORMAT or stored.get("config") != config:
        return None, f"{ZOO_CONFIG_FILE} describes another config than its key"
    try:
        consistent = _key_of(stored["zoo_format"], stored.get("library_version"), stored["config"]) == key
    except (TypeError, ValueError):
        consistent = False
    if not consistent:
        return None, f"the config in {ZOO_CONFIG_FILE} does not hash to the entry's key (an edited entry)"
    run_info = _read_json(entry / RUN_INFO_FILE)
    if not isinstance(run_info, dict) or not isinstance(run_info.get("files"), dict) or run_info.get("key") != key:
        return None, f"no readable {RUN_INFO_FILE} with a file manifest (an incomplete entry)"
    files = run_info["files"]
    if ZOO_CONFIG_FILE not in files or not any(name.endswith(".safetensors") for name in files):
        return None, f"the manifest lists no {ZOO_CONFIG_FILE} or no safetensors weights"
    for name, expected in files.items():
        path = entry / name
        if not path.is_file():
            return None, f"{name} is missing"
        if path.stat().st_size != expected.get("size"):
            return None, f"{name} has {path.stat().st_size} bytes, {expected.get('size')} were written"
        if verify_checksums and _sha256(path) != expected.get("sha256"):
            return None, f"{name} does not match its sha256"
        if name.endswith(".safetensors"):
            problem = _safetensors_problem(path)
            if problem:
                return None, f"{name}: {problem}"
    return run_info, None


def _safetensors_problem(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            handle.keys()
    except Exception as err:  # safetensors raises its own error type for every malformed file
        return f"unreadable safetensors ({err})"
    return None


def _discard(entry: Path, reason: str | None) -> None:
    """Move an unusable entry aside (one rename, so no reader sees it half deleted), then delete it."""
    logger.warning("zoo: the entry %s is unusable (%s); training it again.", entry, reason)
    trash = entry.with_name(f"{_TRASH_PREFIX}{entry.name[:16]}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(entry, trash)
    except FileNotFoundError:  # another process removed it first
        return
    shutil.rmtree(trash, ignore_errors=True)


def _publish(staging: Path, entry: Path, key: str, config: dict, verify_checksums: bool) -> bool:
    """Rename ``staging`` into place (``True``); ``False`` when another process published a usable copy of the same
    entry first (that copy is kept)."""
    for _ in range(3):
        try:
            os.rename(staging, entry)
            return True
        except OSError:
            if not entry.exists():
                raise
        if _check_entry(entry, key, config, verify_checksums)[0] is not None:
            logger.info("zoo: %s was published by another process meanwhile; using that copy.", key[:12])
            return False
        _discard(entry, "replaced while publishing")
    raise RuntimeError(f"zoo: could not publish {entry}: it kept reappearing unusable.")


def _remove_abandoned(root: Path, max_age_s: float = _ABANDONED_AFTER_S) -> list[Path]:
    """Delete temporary and trash folders older than ``max_age_s`` (left by processes that were killed)."""
    removed, now = [], time.time()
    for path in root.glob(".*"):
        if path.is_dir() and path.name.startswith((_TEMP_PREFIX, _TRASH_PREFIX)):
            try:
                old = now - path.stat().st_mtime >= max_age_s
            except FileNotFoundError:
                continue
            if old:
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def main(argv: list[str] | None = None) -> int:
    """``python -m hf_backdoor.zoo``: list the cache's entries."""
    parser = argparse.ArgumentParser(prog="python -m hf_backdoor.zoo", description="List the trained-model cache.")
    parser.add_argument("--cache-dir", default=None, help=f"default: ${CACHE_ENV_VAR} or ~/.cache/hf_backdoor/zoo")
    parser.add_argument("--all", action="store_true", help="also list unusable entries, with the reason")
    parser.add_argument("--verify", action="store_true", help="check every file's sha256 (slower)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--prune", action="store_true", help="remove unusable entries and abandoned temporary folders")
    args = parser.parse_args(argv)
    root = _cache_root(args.cache_dir)
    if args.prune:
        for path in prune(root):
            print(f"removed {path}")
    entries = list_entries(root, include_unusable=args.all, verify_checksums=args.verify)
    if args.json:
        print(json.dumps([{**dataclasses.asdict(e), "path": str(e.path)} for e in entries], indent=1))
        return 0
    print(f"{root}: {len(entries)} entr{'y' if len(entries) == 1 else 'ies'}")
    for e in entries:
        info = e.run_info or {}
        wall = f"{info['wall_s']:.0f}s" if isinstance(info.get("wall_s"), (int, float)) else "-"
        status = f"  UNUSABLE: {e.problem}" if e.problem else ""
        print(f"{e.key[:12]}  {info.get('created', '-')[:19]}  {wall:>7}  {_describe(e.config or {})}{status}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
