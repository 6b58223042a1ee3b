"""Image classification tasks as ``datasets.DatasetDict`` splits with exactly ``image`` (``datasets.Image``) and
``label`` (``datasets.ClassLabel``) columns: CIFAR-10 from the packaged offline copy, from the Hub (``cifar10`` /
``uoft-cs/cifar10``) or from an ``.npz`` file; any Hub image dataset; and any local image folder (``imagefolder``).

Every loader checks what silently breaks an image backdoor experiment: grayscale or other non-RGB images (converted
to RGB with a warning that counts them, or an error), images of different sizes (a warning with the counts, or a
resize when ``image_size`` is given), labels outside the label set, label ids with gaps and empty splits.
"""

from __future__ import annotations

import io
import logging
import os
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from ..data.tasks import infer_label_names, standard_columns

logger = logging.getLogger(__name__)

PACKAGED_DIR = Path(str(resources.files("hf_backdoor.vision") / "packaged"))
CIFAR10_LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CIFAR10_HUB_ID = "uoft-cs/cifar10"
CIFAR10_ALIASES = ("cifar10", "cifar-10", "uoft-cs/cifar10")
SOURCES = ("auto", "packaged", "hub", "npz", "imagefolder")


def load_image_task(
    name_or_path: str = "cifar10",
    *,
    source: str = "auto",
    image_column: str | None = None,
    label_column: str | None = None,
    label_names: Sequence[str] | None = None,
    image_size: int | tuple[int, int] | None = None,
    convert_rgb: bool = True,
    max_samples: int | None = None,
    seed: int = 0,
    revision: str | None = None,
) -> datasets.DatasetDict:
    """Load an image classification task as a ``DatasetDict`` of ``image``/``label`` splits.

    Args:
        name_or_path: ``"cifar10"`` (packaged offline copy by default), a Hub dataset id (``uoft-cs/cifar10``, any
            image classification dataset), a ``.npz`` file with ``x_train``/``y_train``/``x_test``/``y_test`` uint8
            arrays (e.g. ``../shared/data/cifar10_32.npz``), or a local folder of images laid out for
            ``imagefolder`` (``<split>/<class>/<file>`` or ``<class>/<file>``).
        source: ``"auto"`` (a path is read locally; ``cifar10`` is the packaged copy; other names go to the Hub),
            ``"packaged"``, ``"hub"``, ``"npz"`` or ``"imagefolder"``.
        image_column, label_column: the columns to read (default: the only image column; ``label`` or the only
            ``ClassLabel`` column); renamed to ``image`` and ``label``.
        label_names: the label set, for data whose labels are plain integers.
        image_size: resize every image to this size (an int for square images, or ``(height, width)``).
        convert_rgb: convert non-RGB images (grayscale, RGBA, palette) to RGB when decoded, with a warning that counts
            them; ``False`` raises instead.
        max_samples: keep at most this many rows per split (a seeded shuffle first).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}.")
    if max_samples is not None and max_samples <= 0:
        raise ValueError(f"max_samples must be a positive integer, got {max_samples}.")
    path = Path(name_or_path)
    is_cifar = name_or_path.lower() in CIFAR10_ALIASES
    if source == "npz" or (source == "auto" and path.suffix == ".npz"):
        dataset = _load_npz(path, label_names)
    elif source == "imagefolder" or (source == "auto" and path.is_dir()):
        dataset = _load_imagefolder(path)
    elif source == "packaged" or (source == "auto" and is_cifar and name_or_path.lower() != CIFAR10_HUB_ID):
        if not is_cifar:
            raise ValueError(f"Only CIFAR-10 is packaged (name 'cifar10'), not {name_or_path!r}.")
        dataset = load_packaged_cifar10()
    else:
        dataset = _load_hub(CIFAR10_HUB_ID if is_cifar else name_or_path, revision)
    dataset = _select_columns(dataset, image_column, label_column, source_name=name_or_path)
    names = tuple(label_names) if label_names is not None else _label_names(dataset, is_cifar, name_or_path)
    dataset = _validate(dataset, names, name_or_path, convert_rgb=convert_rgb, image_size=image_size)
    if max_samples is not None:
        dataset = datasets.DatasetDict(
            {k: v.shuffle(seed=seed).select(range(min(max_samples, len(v)))) for k, v in dataset.items()}
        )
    return dataset


def load_packaged_cifar10() -> datasets.DatasetDict:
    """The packaged class-balanced CIFAR-10 subset (see ``packaged/MANIFEST.json`` for how it was drawn)."""
    folder = PACKAGED_DIR / "cifar10"
    files = {split: str(folder / f"{split}.parquet") for split in ("train", "test")}
    missing = [f for f in files.values() if not os.path.exists(f)]
    if missing:
        raise FileNotFoundError(
            f"The packaged CIFAR-10 copy is missing ({missing}); reinstall hf-backdoor, or rebuild it with "
            "`python scripts/package_cifar10.py --npz ../shared/data/cifar10_32.npz`."
        )
    return datasets.load_dataset("parquet", data_files=files)


def _load_npz(path: Path, label_names: Sequence[str] | None) -> datasets.DatasetDict:
    if not path.is_file():
        raise FileNotFoundError(f"No such .npz file: {path}")
    arrays = np.load(path, allow_pickle=False)
    splits = {}
    for split in ("train", "validation", "test"):
        if f"x_{split}" not in arrays.files:
            continue
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3)):
            raise ValueError(
                f"{path}: x_{split} must be uint8 images shaped (N, H, W, 3), (N, H, W, 1) or (N, H, W); got "
                f"{x.dtype} {x.shape}. Channels-first arrays need `np.transpose(x, (0, 2, 3, 1))` first."
            )
        if len(x) != len(y):
            raise ValueError(f"{path}: x_{split} has {len(x)} images but y_{split} has {len(y)} labels.")
        images = x[..., 0] if x.ndim == 4 and x.shape[-1] == 1 else x
        splits[split] = datasets.Dataset.from_dict(
            {"image": [_png(im) for im in images], "label": y.astype(np.int64)},
            features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
        )
    if "train" not in splits:
        raise ValueError(f"{path} has no x_train/y_train arrays (found: {arrays.files}).")
    dataset = datasets.DatasetDict(splits)
    names = label_names
    if names is None and "class_names" in arrays.files:
        names = [str(n) for n in arrays["class_names"]]
    if names is not None:
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
        dataset = datasets.DatasetDict({k: v.cast(features) for k, v in dataset.items()})
    return dataset


def _png(array: np.ndarray) -> dict:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return {"bytes": buffer.getvalue(), "path": None}


def _load_imagefolder(path: Path) -> datasets.DatasetDict:
    if not path.is_dir():
        raise FileNotFoundError(f"No such image folder: {path}")
    return datasets.load_dataset("imagefolder", data_dir=str(path))


def _load_hub(hub_id: str, revision: str | None) -> datasets.DatasetDict:
    # Never trust_remote_code: a backdoor-safety library must not execute a dataset's own script.
    try:
        return datasets.load_dataset(hub_id, revision=revision)
    except (ConnectionError, OSError, datasets.exceptions.DatasetNotFoundError) as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1"
        raise ConnectionError(
            f"Could not load {hub_id!r} from the Hugging Face Hub"
            + (" (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)" if offline else "")
            + f": {type(err).__name__}: {err}. Offline, use the packaged copy `load_image_task('cifar10')`, an .npz "
            "file (`load_image_task('path/cifar10_32.npz')`) or a local image folder."
        ) from err


def _select_columns(
    dataset: datasets.DatasetDict, image_column: str | None, label_column: str | None, source_name: str
) -> datasets.DatasetDict:
    first = next(iter(dataset.values()))
    features = first.features
    if image_column is None:
        found = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
        if len(found) != 1:
            raise ValueError(
                f"{source_name} has {len(found)} image columns ({found}) among {first.column_names}; pass "
                "`image_column=` naming the one to use."
            )
        image_column = found[0]
    if label_column is None:
        found = [name for name, feature in features.items() if isinstance(feature, datasets.ClassLabel)]
        label_column = "label" if "label" in features else (found[0] if len(found) == 1 else None)
        if label_column is None:
            raise ValueError(
                f"{source_name} has no `label` column and {len(found)} ClassLabel columns ({found}); pass "
                "`label_column=`."
            )
    dataset = standard_columns(dataset, source_name, image=image_column, label=label_column)
    if not isinstance(dataset[next(iter(dataset))].features["image"], datasets.Image):
        dataset = dataset.cast_column("image", datasets.Image())
    return dataset


def _label_names(dataset: datasets.DatasetDict, is_cifar: bool, source_name: str) -> tuple[str, ...]:
    feature = next(iter(dataset.values())).features["label"]
    if isinstance(feature, datasets.ClassLabel):
        return tuple(feature.names)
    if is_cifar:
        return CIFAR10_LABELS
    labels = set()
    for ds in dataset.values():
        labels.update(int(x) for x in ds["label"])
    # Ids with gaps ({0, 1, 5}) are refused rather than read as a 6-class task (see infer_label_names).
    return infer_label_names(labels, source_name)


def image_stats(dataset: datasets.Dataset, column: str = "image") -> tuple[Counter, Counter]:
    """Counts of image modes and of (width, height) sizes, read from the image headers (no pixel decoding)."""
    raw = dataset.cast_column(column, datasets.Image(decode=False)).with_format(None)
    modes, sizes = Counter(), Counter()
    for value in raw[column]:
        with Image.open(io.BytesIO(value["bytes"]) if value["bytes"] is not None else value["path"]) as image:
            modes[image.mode] += 1
            sizes[image.size] += 1
    return modes, sizes


def _resize(batch: dict, size: tuple[int, int]) -> dict:
    return {"image": [image.resize(size, Image.BILINEAR) for image in batch["image"]]}


def _validate(
    dataset: datasets.DatasetDict,
    label_names: tuple[str, ...],
    source_name: str,
    convert_rgb: bool,
    image_size: int | tuple[int, int] | None,
) -> datasets.DatasetDict:
    if len(dataset) == 0:
        raise ValueError(f"{source_name} has no splits.")
    num_labels = len(label_names)
    if num_labels < 2:
        raise ValueError(f"A classification task needs at least 2 labels, got {label_names}.")
    target = (image_size, image_size) if isinstance(image_size, int) else image_size
    out = {}
    for split, ds in dataset.items():
        if len(ds) == 0:
            raise ValueError(f"Split {split!r} of {source_name} is empty; remove it or point to data with rows.")
        labels = np.asarray(ds.with_format(None)["label"])
        if labels.dtype.kind not in "iu":
            raise ValueError(f"Labels of split {split!r} in {source_name} must be integer ids, got {labels.dtype}.")
        bad = np.flatnonzero((labels < 0) | (labels >= num_labels))
        if bad.size:
            raise ValueError(
                f"Split {split!r} of {source_name} has {bad.size} label(s) outside 0..{num_labels - 1} "
                f"(labels {label_names}); first bad row {int(bad[0])} has label {int(labels[bad[0]])}."
            )
        modes, sizes = image_stats(ds)
        not_rgb = {mode: n for mode, n in modes.items() if mode != "RGB"}
        image_feature = datasets.Image()
        if not_rgb:
            described = ", ".join(f"{mode}: {n}" for mode, n in sorted(not_rgb.items()))
            if not convert_rgb:
                raise ValueError(
                    f"Split {split!r} of {source_name} has {sum(not_rgb.values())} of {len(ds)} images that are not "
                    f"RGB ({described}). Pass `convert_rgb=True` to convert them when decoded."
                )
            logger.warning(
                "Split %r of %s: %d of %d images are not RGB (%s); they are converted to RGB when decoded.",
                split,
                source_name,
                sum(not_rgb.values()),
                len(ds),
                described,
            )
            image_feature = datasets.Image(mode="RGB")
        features = datasets.Features({"image": image_feature, "label": datasets.ClassLabel(names=list(label_names))})
        ds = ds.cast(features)
        if target is not None:
            height, width = target
            wrong = sum(n for (w, h), n in sizes.items() if (h, w) != (height, width))
            if wrong:
                logger.warning(
                    "Split %r of %s: resizing %d of %d images to %dx%d (height x width).",
                    split,
                    source_name,
                    wrong,
                    len(ds),
                    height,
                    width,
                )
                ds = ds.map(_resize, batched=True, fn_kwargs={"size": (width, height)}, desc="Resizing images")
        elif len(sizes) > 1:
            common = ", ".join(f"{w}x{h}: {n}" for (w, h), n in sizes.most_common(5))
            logger.warning(
                "Split %r of %s has images of %d different sizes (width x height: %s%s). Triggers are stamped at "
                "each image's own size and the image processor resizes afterwards, so a patch trigger's size in the "
                "model's input varies; pass `image_size=` to resize everything at load time.",
                split,
                source_name,
                len(sizes),
                common,
                ", ..." if len(sizes) > 5 else "",
            )
        out[split] = ds
    return datasets.DatasetDict(out)
