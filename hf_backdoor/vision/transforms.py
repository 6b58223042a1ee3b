"""Image transforms for training and evaluation, applied lazily with ``datasets.Dataset.with_transform``.

:class:`ImageClassificationTransform` turns ``image``/``label`` rows into ``pixel_values``/``label`` with the
model's image processor, and for training adds the standard CIFAR augmentation (random crop after 4-pixel reflect
padding, horizontal flip; the reference ViT recipe's). Augmentation draws from torch's global generator, which
``Trainer`` seeds.
"""

from __future__ import annotations

import logging

import datasets
import torch
from PIL import Image
from torch.nn import functional as F

from ..attacks.vision.base import to_array
from ..data.rows import ROW_INDEX, add_row_index

logger = logging.getLogger(__name__)

__all__ = [
    "ROW_INDEX",
    "TRAINING_AUGMENTATION_KEY",
    "ImageClassificationTransform",
    "prepare_image_dataset",
    "random_crop_flip",
    "record_training_augmentation",
    "recorded_training_augmentation",
]

# The model-config attribute that keeps the crop and flip a model was trained through, so that `save_pretrained`
# saves them and a defense given raw rows for a model read from disk augments them the same way.
TRAINING_AUGMENTATION_KEY = "hf_backdoor_training_augmentation"


class ImageClassificationTransform:
    """``image``/``label`` batch -> ``pixel_values`` (float tensor) and ``label``.

    Args:
        image_processor: the model's image processor (resize, rescale, normalise).
        augment: random crop (``crop_padding`` reflect padding) and horizontal flip, for training.
        keep_row_index: also emit the ``row_index`` column (what defenses such as ABL use to recognise a row across
            epochs when augmentation changes its pixels). Only for ``BackdoorSafeTrainer`` with such a defense: a
            plain ``Trainer`` would pass it to the model.
    """

    def __init__(
        self,
        image_processor,
        augment: bool = False,
        crop_padding: int = 4,
        horizontal_flip: bool = True,
        image_column: str = "image",
        label_column: str = "label",
        keep_row_index: bool = False,
    ):
        if crop_padding < 0:
            raise ValueError(f"crop_padding must be >= 0, got {crop_padding}.")
        self.image_processor = image_processor
        self.augment = augment
        self.crop_padding = crop_padding
        self.horizontal_flip = horizontal_flip
        self.image_column = image_column
        self.label_column = label_column
        self.keep_row_index = keep_row_index
        self._warned_modes = False

    def without_augmentation(self) -> ImageClassificationTransform:
        """The same transform for evaluation (no random crop or flip; the settings are kept for
        :meth:`with_augmentation`)."""
        return self._with_augment(False)

    def with_augmentation(self) -> ImageClassificationTransform:
        """The same transform with the training augmentation (this transform's crop padding and flip) switched on."""
        return self._with_augment(True)

    def _with_augment(self, augment: bool) -> ImageClassificationTransform:
        return ImageClassificationTransform(
            self.image_processor,
            augment=augment,
            crop_padding=self.crop_padding,
            horizontal_flip=self.horizontal_flip,
            image_column=self.image_column,
            label_column=self.label_column,
            keep_row_index=self.keep_row_index,
        )

    def augmentation_settings(self) -> dict:
        """The crop padding and flip, as keyword arguments of this class (what :func:`record_training_augmentation`
        keeps)."""
        return {"crop_padding": self.crop_padding, "horizontal_flip": self.horizontal_flip}

    def describe_augmentation(self) -> str:
        """What the augmentation does, for reports: e.g. ``random crop (reflect padding 4) and horizontal flip``."""
        parts = [f"random crop (reflect padding {self.crop_padding})"] if self.crop_padding else []
        parts += ["horizontal flip"] if self.horizontal_flip else []
        return " and ".join(parts) or "none"

    def __call__(self, batch: dict) -> dict:
        images = [_as_pil(image, i) for i, image in enumerate(batch[self.image_column])]
        not_rgb = [i for i, image in enumerate(images) if image.mode != "RGB"]
        if not_rgb:
            if not self._warned_modes:
                logger.warning(
                    "%d of %d images in a batch are not RGB (e.g. %s); converting them to RGB. Load with "
                    "`hf_backdoor.vision.load_image_task` to convert (and count) them once.",
                    len(not_rgb),
                    len(images),
                    images[not_rgb[0]].mode,
                )
                self._warned_modes = True
            images = [image.convert("RGB") if image.mode != "RGB" else image for image in images]
        pixel_values = self.image_processor(images, return_tensors="pt")["pixel_values"]
        if self.augment:
            pixel_values = random_crop_flip(pixel_values, self.crop_padding, self.horizontal_flip)
        out = {"pixel_values": pixel_values}
        if self.label_column in batch:
            # Emitted as "label": the default collators rename it to "labels", and `dataset["label"]` keeps working
            # on the transformed dataset (hf_backdoor.metrics.evaluate_backdoor reads it that way).
            out["label"] = batch[self.label_column]
        if self.keep_row_index:
            if ROW_INDEX not in batch:
                raise ValueError(
                    f"keep_row_index=True but the dataset has no {ROW_INDEX!r} column: build it with "
                    "`prepare_image_dataset(..., keep_row_index=True)`."
                )
            out[ROW_INDEX] = batch[ROW_INDEX]
        return out


def _as_pil(value, index: int) -> Image.Image:
    """A PIL image from any stored form: PIL as is; pixel arrays (nested lists or integer arrays in 0..255, which is
    how a ``Dataset`` hands back uint8 arrays), file paths and undecoded ``datasets.Image`` values converted."""
    if isinstance(value, Image.Image):
        return value
    array = to_array(value, index)  # raises on values outside 0..255 and on floats, saying how to convert
    return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)


def random_crop_flip(pixel_values: torch.Tensor, padding: int = 4, flip: bool = True) -> torch.Tensor:
    """Per-image random crop of the original size after reflect padding, and a random horizontal flip."""
    batch, _, height, width = pixel_values.shape
    out = pixel_values
    if padding:
        padded = F.pad(pixel_values, (padding, padding, padding, padding), mode="reflect")
        offsets = torch.randint(0, 2 * padding + 1, (batch, 2))
        out = torch.stack([padded[i, :, r : r + height, c : c + width] for i, (r, c) in enumerate(offsets.tolist())])
    if flip:
        flips = torch.rand(batch) < 0.5
        out = torch.where(flips[:, None, None, None], out.flip(-1), out)
    return out


def prepare_image_dataset(
    dataset: datasets.Dataset | datasets.DatasetDict,
    image_processor,
    train: bool = False,
    keep_row_index: bool = False,
    **transform_kwargs,
):
    """``dataset.with_transform`` of an :class:`ImageClassificationTransform` (augmented when ``train``).

    With ``keep_row_index`` the ``row_index`` column is emitted with every row (for ABL on images; see
    :class:`ImageClassificationTransform`); it is the one ``poison_dataset`` adds, or each row's position (0..n-1)
    when the dataset has none (:func:`hf_backdoor.data.rows.add_row_index`). Images may be a ``datasets.Image``
    column, file paths or pixel arrays (e.g. uint8 arrays stored in a ``Dataset``, which read back as lists). Other
    columns (``poisoned``, ``orig_label``) stay in the dataset for reports but are not emitted. Train with
    ``remove_unused_columns=False``: otherwise ``Trainer`` drops the ``image`` column the transform reads.
    """
    if isinstance(dataset, datasets.DatasetDict):
        return datasets.DatasetDict(
            {
                k: prepare_image_dataset(v, image_processor, train, keep_row_index, **transform_kwargs)
                for k, v in dataset.items()
            }
        )
    if keep_row_index:
        dataset = add_row_index(dataset)
    transform = ImageClassificationTransform(
        image_processor, augment=train, keep_row_index=keep_row_index, **transform_kwargs
    )
    return dataset.with_transform(transform)


def _augmenting_transform(dataset):
    from ..data.rows import format_transform

    transform = format_transform(dataset) if isinstance(dataset, datasets.Dataset) else None
    return transform if isinstance(transform, ImageClassificationTransform) and transform.augment else None


def record_training_augmentation(model, train_dataset) -> dict | None:
    """Keep the crop padding and flip of ``train_dataset``'s augmentation on ``model.config``
    (:data:`TRAINING_AUGMENTATION_KEY`), where ``save_pretrained`` saves them; returns them, or ``None`` (nothing
    recorded) when the dataset is not augmented through an :class:`ImageClassificationTransform`.
    ``BackdoorSafeTrainer.train`` calls it; call it after training with a plain ``Trainer``."""
    transform = _augmenting_transform(train_dataset)
    config = getattr(model, "config", None)
    if transform is None or config is None:
        return None
    settings = transform.augmentation_settings()
    setattr(config, TRAINING_AUGMENTATION_KEY, settings)
    return settings


def recorded_training_augmentation(model) -> dict | None:
    """The crop padding and flip ``model`` was trained through, as :func:`record_training_augmentation` kept them
    (also on a model read back with ``from_pretrained``), or ``None``."""
    settings = getattr(getattr(model, "config", None), TRAINING_AUGMENTATION_KEY, None)
    if not isinstance(settings, dict):
        return None
    return {"crop_padding": int(settings["crop_padding"]), "horizontal_flip": bool(settings["horizontal_flip"])}
