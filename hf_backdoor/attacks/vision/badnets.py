"""BadNets for images: a small fixed patch stamped onto the image.

Gu et al., "BadNets: Identifying Vulnerabilities in the Machine Learning Model Supply Chain" (2017). The CIFAR-10
setting most defenses are evaluated on (ABL, NAD, RNP, EBYD, BackdoorBench) is a 3x3 patch in the bottom-right corner,
10% of the training set, dirty-label, all-to-one. ABL's official "gridTrigger" is a 3x3 black-and-white checkerboard
there; the reference measurements of this project used a white 3x3 patch, which is the default here.

Deviations: none in the trigger; the position, size and pattern are configurable.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ...registry import register_attack
from .base import ImagePoisonConfig, ImagePoisoner, first_image_size, processor_output_size

logger = logging.getLogger(__name__)

POSITIONS = ("bottom-right", "bottom-left", "top-right", "top-left", "center")
PATTERNS = ("white", "black", "checkerboard")
# Below this many pixels in the model's input a resized patch is a blur, not a trigger (see check_image_processor).
MIN_PATCH_PIXELS = 2


@dataclass
class ImageBadNetsConfig(ImagePoisonConfig):
    """BadNets: a ``patch_size`` x ``patch_size`` patch at ``position``, ``margin`` pixels from the borders.

    Args:
        patch_size: side of the square patch in pixels (of the stored image, before any resizing by the model's
            image processor).
        position: a corner name, ``"center"``, or ``(row, col)`` of the patch's top-left pixel.
        margin: distance in pixels from the borders for corner positions.
        pattern: ``"white"``, ``"black"``, ``"checkerboard"`` (white where row + col is even, as ABL's grid trigger)
            or a uint8 array of shape (patch_size, patch_size) or (patch_size, patch_size, 3).
    """

    patch_size: int = 3
    position: str | tuple[int, int] = "bottom-right"
    margin: int = 0
    pattern: str | np.ndarray = "white"

    name = "badnet"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.patch_size < 1:
            raise ValueError(f"patch_size must be >= 1 pixel, got {self.patch_size}.")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}.")
        if isinstance(self.position, str):
            if self.position not in POSITIONS:
                raise ValueError(f"position must be one of {POSITIONS} or a (row, col) pair, got {self.position!r}.")
        else:
            position = tuple(int(v) for v in self.position)
            if len(position) != 2 or min(position) < 0:
                raise ValueError(f"position must be a (row, col) pair of non-negative ints, got {self.position!r}.")
            self.position = position
        if isinstance(self.pattern, str):
            if self.pattern not in PATTERNS:
                raise ValueError(f"pattern must be one of {PATTERNS} or a uint8 array, got {self.pattern!r}.")
        else:
            pattern = np.asarray(self.pattern)
            if pattern.dtype != np.uint8 or pattern.shape[:2] != (self.patch_size, self.patch_size):
                raise ValueError(
                    f"A pattern array must be uint8 of shape ({self.patch_size}, {self.patch_size}[, 3]), got "
                    f"{pattern.dtype} {pattern.shape}."
                )

    def patch_array(self, channels: int) -> np.ndarray:
        """The patch as a uint8 (patch_size, patch_size, channels) array."""
        size = self.patch_size
        if isinstance(self.pattern, str):
            if self.pattern == "white":
                patch = np.full((size, size), 255, dtype=np.uint8)
            elif self.pattern == "black":
                patch = np.zeros((size, size), dtype=np.uint8)
            else:
                rows, cols = np.indices((size, size))
                patch = np.where((rows + cols) % 2 == 0, 255, 0).astype(np.uint8)
        else:
            patch = np.asarray(self.pattern)
        if patch.ndim == 2:
            patch = np.repeat(patch[:, :, None], channels, axis=2)
        elif patch.shape[2] != channels:
            patch = np.repeat(patch.mean(axis=2, keepdims=True).astype(np.uint8), channels, axis=2)
        return patch

    def top_left(self, height: int, width: int) -> tuple[int, int]:
        """The patch's top-left pixel in an image of this size (raises if the patch does not fit)."""
        size, margin = self.patch_size, self.margin
        if isinstance(self.position, tuple):
            row, col = self.position
        elif self.position == "center":
            row, col = (height - size) // 2, (width - size) // 2
        else:
            vertical, horizontal = self.position.split("-")
            row = margin if vertical == "top" else height - size - margin
            col = margin if horizontal == "left" else width - size - margin
        if row < 0 or col < 0 or row + size > height or col + size > width:
            raise ValueError(
                f"A {size}x{size} patch at {self.position!r} (margin {margin}) does not fit a {height}x{width} image; "
                "use a smaller patch_size/margin or resize the images."
            )
        return row, col


class ImageBadNetsPoisoner(ImagePoisoner):
    config: ImageBadNetsConfig

    def check_image_processor(self, image_processor, dataset) -> None:
        """Warn when the model's resizing shrinks the patch below 2 pixels.

        The patch is stamped at the stored resolution and the image processor resizes afterwards: a 3x3 patch on
        96x96 images resized to 32x32 becomes one blurred pixel, and the backdoor is then not learnt, or an ASR
        measured on it means little. Checked on the first image (``load_image_task`` warns about mixed sizes).
        """
        height, width = first_image_size(dataset, self.config.image_column)
        target = processor_output_size(image_processor, height, width)
        if target is None:
            return
        scale = min(target[0] / height, target[1] / width)
        side = self.config.patch_size * scale
        if side < MIN_PATCH_PIXELS:
            logger.warning(
                "The %dx%d BadNets patch is stamped on %dx%d images, which the model's image processor resizes to "
                "%dx%d: in the model's input the patch is about %.1f pixel(s) wide and blurred into its neighbours, "
                "so the backdoor may not be learnt. Use patch_size >= %d, or resize the images at load time "
                "(`load_image_task(..., image_size=%d)`) so the patch is stamped at the model's resolution.",
                self.config.patch_size,
                self.config.patch_size,
                height,
                width,
                target[0],
                target[1],
                side,
                math.ceil(MIN_PATCH_PIXELS / scale - 1e-9),
                target[0] if target[0] == target[1] else min(target),
            )

    def trigger(self, image: np.ndarray, index: int, salt: int) -> np.ndarray:
        row, col = self.config.top_left(image.shape[0], image.shape[1])
        size = self.config.patch_size
        out = image.copy()
        out[row : row + size, col : col + size] = self.config.patch_array(image.shape[2])
        return out


register_attack(ImageBadNetsConfig, ImageBadNetsPoisoner, aliases=("badnets",))
