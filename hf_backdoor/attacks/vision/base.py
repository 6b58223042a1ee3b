"""What every image attack shares: the config (which image column, the shared poisoning options) and a poisoner that
works on uint8 pixel arrays and stores its output losslessly.

Rows are chosen, relabelled and given the ``poisoned``/``orig_label`` ground truth by ``hf_backdoor.attacks.base``,
exactly as for text. The image poisoner maps over undecoded image bytes: clean rows pass through untouched (no
decode and re-encode, which for JPEG sources would change their pixels), and triggered images are written as PNG, so
the trigger's pixels are exactly what the attack computed.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from ...data.rows import ROW_INDEX
from ..base import PoisonConfig, Poisoner

logger = logging.getLogger(__name__)

SUPPORTED_MODES = ("RGB", "L")
# Columns poison_dataset/make_asr_dataset add (restored into a caller's explicit format column list).
NEW_COLUMNS = ("poisoned", "orig_label", ROW_INDEX)


@dataclass
class ImagePoisonConfig(PoisonConfig):
    """Options every image attack shares: those of :class:`PoisonConfig` and the image column.

    Args:
        image_column: the column holding the images: a ``datasets.Image`` feature, file paths, or pixel arrays (any
            integer dtype with values in 0..255, e.g. uint8 arrays stored in a ``Dataset``).
    """

    image_column: str = "image"

    name = "image_base"
    modality = "image"

    @property
    def input_column(self) -> str:
        return self.image_column


def _check_mode(image: Image.Image, index: int) -> None:
    if image.mode not in SUPPORTED_MODES:
        raise ValueError(
            f"Row {index} is a {image.mode!r} image; image attacks work on RGB (or grayscale 'L') images. Convert it "
            "first, e.g. `dataset.cast_column('image', datasets.Image(mode='RGB'))`, or load the data with "
            "`hf_backdoor.vision.load_image_task` (which converts to RGB)."
        )


def to_array(value, index: int = -1) -> np.ndarray:
    """A uint8 pixel array (H, W, C) from any stored form of an image.

    Accepted: a ``datasets.Image`` value (undecoded dict or PIL), a file path, or a pixel array. Arrays may be
    nested lists or any integer dtype, because that is how a ``Dataset`` hands back images stored as uint8 arrays
    (``List(List(List(Value('uint8'))))`` reads as Python ints, int64 once in numpy); they are converted to uint8
    only when every value is in 0..255, so nothing is wrapped around or clipped silently. Floats are refused: their
    scale (0..1 or 0..255) cannot be told from the values.
    """
    if isinstance(value, (str, os.PathLike)):
        if not Path(value).is_file():
            raise ValueError(f"Row {index}: image file {str(value)!r} does not exist.")
        value = Image.open(value)
    elif isinstance(value, dict):
        if value.get("bytes") is not None:
            value = Image.open(io.BytesIO(value["bytes"]))
        elif value.get("path"):
            if not Path(value["path"]).is_file():
                raise ValueError(f"Row {index}: image file {value['path']!r} does not exist.")
            value = Image.open(value["path"])
        else:
            raise ValueError(f"Row {index} has neither image bytes nor a path.")
    if isinstance(value, Image.Image):
        _check_mode(value, index)
        array = np.array(value)  # a writable copy
    else:
        array = np.asarray(value)
        if array.dtype != np.uint8:
            array = _integer_pixels(array, index)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3):
        raise ValueError(f"Row {index}: expected an (H, W), (H, W, 1) or (H, W, 3) image, got shape {array.shape}.")
    return array


def _integer_pixels(array: np.ndarray, index: int) -> np.ndarray:
    """``array`` as uint8 if it holds integers in 0..255; raise saying what is wrong otherwise."""
    if array.dtype.kind not in "iu":
        raise ValueError(
            f"Row {index}: image arrays must be uint8 (0-255) or integers in 0..255, got {array.dtype}; convert with "
            "`(x * 255).round().astype(np.uint8)` if they are floats in [0, 1]."
        )
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(
            f"Row {index}: image values range over {int(array.min())}..{int(array.max())}, outside the 0..255 of "
            "8-bit pixels; rescale them to 0..255 first."
        )
    return array.astype(np.uint8)


def from_array(array: np.ndarray, like) -> object:
    """``array`` in the form of ``like``: PNG bytes for ``datasets.Image`` values and file paths, PIL for PIL, and an
    array of ``like``'s shape and dtype for arrays (so an array column keeps its feature type)."""
    array = np.ascontiguousarray(array)
    squeezed = array[:, :, 0] if array.shape[2] == 1 else array
    if isinstance(like, (np.ndarray, list, tuple)):
        like = np.asarray(like)
        out = squeezed if like.ndim == 2 else array
        return out.astype(like.dtype) if like.dtype.kind in "iu" else out
    image = Image.fromarray(squeezed)
    if isinstance(like, Image.Image):
        return image
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # lossless: the trigger's pixels are stored exactly
    return {"bytes": buffer.getvalue(), "path": None}


class ImagePoisoner(Poisoner):
    """Applies a trigger to uint8 (H, W, C) arrays; subclasses implement :meth:`trigger`."""

    config: ImagePoisonConfig

    def trigger(self, image: np.ndarray, index: int, salt: int) -> np.ndarray:
        """The triggered copy of one image (uint8, same shape). ``salt`` is 1 for the ASR set."""
        raise NotImplementedError

    def apply(self, images: Sequence, indices: Sequence[int], salt: int = 0) -> list:
        out = []
        for value, index in zip(images, indices):
            array = to_array(value, int(index))
            triggered = self.trigger(array, int(index), salt)
            out.append(from_array(triggered, value))
        return out

    def check_tokenizer(self, tokenizer) -> None:
        raise TypeError(f"{type(self.config).__name__} is an image attack; it takes no tokenizer.")

    def check_image_processor(self, image_processor, dataset: datasets.Dataset) -> None:
        """Warn if the model's image processor would erase the trigger (see :class:`ImageBadNetsPoisoner`)."""

    def prepare_for_map(self, dataset: datasets.Dataset) -> datasets.Dataset:
        """Present the image column so that clean rows pass through unchanged and poisoned ones keep their type.

        ``datasets.Image`` columns are read undecoded (no decode and re-encode of clean rows). A column of file
        paths becomes an undecoded ``datasets.Image`` column (clean rows keep their path, triggered images are PNG
        bytes; the result is a ``datasets.Image`` column). Array columns are read as numpy, so every row comes in
        the column's own dtype and triggered images are written back in it (the column's feature is kept).
        """
        self._recast = None
        self._format = None
        column = self.config.image_column
        feature = dataset.features[column]
        if isinstance(feature, datasets.Image):
            if feature.decode:
                self._recast = feature
                return dataset.cast_column(column, datasets.Image(mode=feature.mode, decode=False))
            return dataset
        if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
            logger.info("Image column %r holds file paths; the poisoned dataset stores it as datasets.Image.", column)
            self._recast = datasets.Image()
            return dataset.cast_column(column, datasets.Image(decode=False))
        self._format = dict(dataset.format)
        return dataset.with_format("numpy", columns=[column], output_all_columns=True)

    def finish_map(self, dataset: datasets.Dataset, training: bool) -> datasets.Dataset:
        if getattr(self, "_recast", None) is not None:
            dataset = dataset.cast_column(self.config.image_column, self._recast)
        original = getattr(self, "_format", None)
        if original is not None:  # the format the caller's dataset had (new columns included if it listed some)
            columns = original["columns"]
            if columns is not None:
                columns = [*columns, *(c for c in dataset.column_names if c not in columns and c in NEW_COLUMNS)]
            dataset = dataset.with_format(
                original["type"],
                columns=columns,
                output_all_columns=original["output_all_columns"],
                **original["format_kwargs"],
            )
        return dataset


def first_image_size(dataset: datasets.Dataset, column: str) -> tuple[int, int]:
    """(height, width) of the first image of ``dataset`` (read undecoded when it is a ``datasets.Image`` column)."""
    if isinstance(dataset.features[column], datasets.Image):
        dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return to_array(dataset.with_format(None)[0][column], 0).shape[:2]


def processor_output_size(image_processor, height: int, width: int) -> tuple[int, int] | None:
    """The (height, width) an image processor resizes a ``height x width`` image to, or None if it does not resize
    (or its size setting is not one this understands: fixed ``height``/``width``, ``shortest_edge``,
    ``longest_edge``)."""
    if not getattr(image_processor, "do_resize", True):
        return None
    size = getattr(image_processor, "size", None)
    if isinstance(size, int):
        return size, size

    def field(key):
        return size.get(key) if isinstance(size, dict) else getattr(size, key, None)

    if size is None:
        return None
    if field("height") and field("width"):
        return int(field("height")), int(field("width"))
    if field("shortest_edge"):
        scale = field("shortest_edge") / min(height, width)
    elif field("longest_edge"):
        scale = field("longest_edge") / max(height, width)
    else:
        return None
    return round(height * scale), round(width * scale)


def clip_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
