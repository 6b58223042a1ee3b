"""Blended: a fixed full-image pattern mixed into the image.

Chen et al., "Targeted Backdoor Attacks on Deep Learning Systems Using Data Poisoning" (2017): the poisoned image is
``(1 - alpha) * x + alpha * pattern``. The paper blends a Hello Kitty photo or a random-noise pattern; BackdoorBench
uses the Hello Kitty image with alpha 0.2 for training and testing.

Deviations: no Hello Kitty image is shipped; the default pattern is uniform random noise drawn once from ``seed``
(the paper's other pattern), and any image file or uint8 array can be given instead (resized to each image's size).
Results are rounded to uint8 and stored losslessly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ...registry import register_attack
from .base import ImagePoisonConfig, ImagePoisoner, clip_uint8


@dataclass
class BlendedConfig(ImagePoisonConfig):
    """Blended: ``(1 - alpha) * image + alpha * pattern``.

    Args:
        alpha: blend ratio of the pattern for training rows, in (0, 1].
        test_alpha: blend ratio for the ASR set (default: ``alpha``).
        pattern: ``"noise"`` (uniform noise drawn from ``seed``), a path to an image file, or a uint8 (H, W[, 3])
            array; resized (bilinear) to each image's size.
    """

    alpha: float = 0.2
    test_alpha: float | None = None
    pattern: str | np.ndarray = field(default="noise")

    name = "blended"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("alpha", "test_alpha"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}.")
        if isinstance(self.pattern, (str, Path)) and self.pattern != "noise" and not Path(self.pattern).is_file():
            raise ValueError(
                f"pattern must be 'noise', an image file or a uint8 array; {self.pattern!r} is not a file."
            )
        if isinstance(self.pattern, np.ndarray) and self.pattern.dtype != np.uint8:
            raise ValueError(f"A pattern array must be uint8, got {self.pattern.dtype}.")


class BlendedPoisoner(ImagePoisoner):
    config: BlendedConfig

    def __init__(self, config: BlendedConfig):
        super().__init__(config)
        self._patterns: dict[tuple[int, int, int], np.ndarray] = {}

    def pattern_for(self, height: int, width: int, channels: int) -> np.ndarray:
        """The pattern at this image size, as float32 (H, W, C) in [0, 255] (cached per size)."""
        key = (height, width, channels)
        if key not in self._patterns:
            pattern = self.config.pattern
            if isinstance(pattern, str) and pattern == "noise":
                # One pattern per size, drawn from the seed alone: every row and the ASR set share it.
                rng = np.random.default_rng([self.config.seed, height, width])
                array = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
            else:
                source = Image.open(pattern) if isinstance(pattern, (str, Path)) else Image.fromarray(pattern)
                array = np.asarray(source.convert("RGB").resize((width, height), Image.BILINEAR))
            if channels == 1:
                array = np.asarray(Image.fromarray(array).convert("L"))[:, :, None]
            self._patterns[key] = array.astype(np.float32)
        return self._patterns[key]

    def trigger(self, image: np.ndarray, index: int, salt: int) -> np.ndarray:
        alpha = self.config.alpha if salt == 0 or self.config.test_alpha is None else self.config.test_alpha
        pattern = self.pattern_for(*image.shape)
        return clip_uint8((1.0 - alpha) * image.astype(np.float32) + alpha * pattern)


register_attack(BlendedConfig, BlendedPoisoner)
