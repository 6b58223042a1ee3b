"""WaNet: an imperceptible warping trigger.

Nguyen and Tran, "WaNet -- Imperceptible Warping-based Backdoor Attack" (ICLR 2021); official code
VinAIResearch/Warping-based_Backdoor_Attack-release. A random ``k x k`` field of 2-D offsets, normalised by its mean
absolute value and upsampled (bicubic) to the image size, is added to the identity sampling grid with strength ``s``
(``grid = identity + s * field / size``, clamped to [-1, 1]); the image is resampled on that grid
(``grid_sample``, bilinear, ``align_corners=True``). In "noise mode" (``cross_ratio``) another
``cross_ratio x (poisoned rows)`` clean rows are warped with the trigger grid plus per-row random noise and keep
their labels, so the model must learn the exact warp rather than "any warp". Official CIFAR-10 defaults (also
BackdoorBench's): ``k = 4``, ``s = 0.5``, ``grid_rescale = 1``, ``cross_ratio = 2``.

Deviations: the official code warps float tensors on the fly at every epoch; here the warped images are rounded to
uint8 and stored losslessly (PNG) once, like every other poisoned row, so the noise rows are fixed rather than
redrawn each epoch. The warp field is drawn from ``seed`` (a torch CPU generator), so it is the same for every run
with the same seed. Non-square images get per-axis normalisation (offsets divided by width and height).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import datasets
import numpy as np
import torch
from torch.nn import functional as F

from ...registry import register_attack
from .base import ImagePoisonConfig, ImagePoisoner, clip_uint8, from_array, to_array

logger = logging.getLogger(__name__)


@dataclass
class WaNetConfig(ImagePoisonConfig):
    """WaNet: warp strength ``s`` over a ``k x k`` control grid; ``cross_ratio`` noise rows per poisoned row."""

    k: int = 4
    s: float = 0.5
    grid_rescale: float = 1.0
    cross_ratio: float = 2.0

    name = "wanet"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 2:
            raise ValueError(f"k (control grid size) must be >= 2, got {self.k}.")
        if self.s <= 0:
            raise ValueError(f"s (warp strength) must be > 0, got {self.s}.")
        if self.grid_rescale <= 0:
            raise ValueError(f"grid_rescale must be > 0, got {self.grid_rescale}.")
        if self.cross_ratio < 0:
            raise ValueError(f"cross_ratio must be >= 0 (0 turns noise mode off), got {self.cross_ratio}.")


class WaNetPoisoner(ImagePoisoner):
    config: WaNetConfig

    def __init__(self, config: WaNetConfig):
        super().__init__(config)
        self._grids: dict[tuple[int, int], torch.Tensor] = {}

    def grid(self, height: int, width: int) -> torch.Tensor:
        """The trigger's sampling grid (1, H, W, 2) for this image size (cached)."""
        key = (height, width)
        if key not in self._grids:
            cfg = self.config
            generator = torch.Generator().manual_seed(cfg.seed)
            control = torch.rand(1, 2, cfg.k, cfg.k, generator=generator) * 2 - 1
            control = control / control.abs().mean()
            field = F.interpolate(control, size=(height, width), mode="bicubic", align_corners=True)
            field = field.permute(0, 2, 3, 1)  # (1, H, W, 2): x (width) offset, then y (height) offset
            rows = torch.linspace(-1, 1, height)
            cols = torch.linspace(-1, 1, width)
            grid_y, grid_x = torch.meshgrid(rows, cols, indexing="ij")
            identity = torch.stack((grid_x, grid_y), dim=2)[None]
            scale = torch.tensor([width, height], dtype=torch.float32)
            self._grids[key] = ((identity + cfg.s * field / scale) * cfg.grid_rescale).clamp(-1, 1)
        return self._grids[key]

    @staticmethod
    def warp(image: np.ndarray, grid: torch.Tensor) -> np.ndarray:
        tensor = torch.from_numpy(image).permute(2, 0, 1)[None].float()
        warped = F.grid_sample(tensor, grid, mode="bilinear", align_corners=True)
        return clip_uint8(warped[0].permute(1, 2, 0).numpy())

    def trigger(self, image: np.ndarray, index: int, salt: int) -> np.ndarray:
        return self.warp(image, self.grid(image.shape[0], image.shape[1]))

    def noise_warp(self, image: np.ndarray, index: int) -> np.ndarray:
        """Noise mode: the trigger grid plus per-row uniform noise of one pixel (seeded by the row index)."""
        height, width = image.shape[:2]
        generator = torch.Generator().manual_seed(int(self.row_rng(index, salt=2).integers(2**31)))
        noise = (torch.rand(1, height, width, 2, generator=generator) * 2 - 1) / torch.tensor([width, height])
        return self.warp(image, (self.grid(height, width) + noise).clamp(-1, 1))

    def finish_map(self, dataset: datasets.Dataset, training: bool) -> datasets.Dataset:
        if training and self.config.cross_ratio > 0:
            dataset = self._add_noise_rows(dataset)
        return super().finish_map(dataset, training)

    def _add_noise_rows(self, dataset: datasets.Dataset) -> datasets.Dataset:
        poisoned = np.asarray(dataset["poisoned"])
        clean_rows = np.flatnonzero(poisoned == 0)
        wanted = int(self.config.cross_ratio * poisoned.sum())
        if wanted > len(clean_rows):
            logger.warning(
                "WaNet noise mode asks for %d noise rows (cross_ratio %.2f x %d poisoned) but only %d clean rows "
                "exist; all of them get noise warps.",
                wanted,
                self.config.cross_ratio,
                int(poisoned.sum()),
                len(clean_rows),
            )
            wanted = len(clean_rows)
        rng = np.random.default_rng([self.config.seed, 2])
        chosen = np.zeros(len(dataset), dtype=bool)
        chosen[rng.choice(clean_rows, size=wanted, replace=False)] = True
        column = self.config.image_column

        def _noise(batch, indices):
            images = list(batch[column])
            for i, index in enumerate(indices):
                if chosen[index]:
                    images[i] = from_array(self.noise_warp(to_array(images[i], index), index), images[i])
            return {column: images}

        logger.info("WaNet noise mode: %d clean rows warped with noise, labels kept.", wanted)
        return dataset.map(_noise, batched=True, with_indices=True, desc="WaNet noise rows")


register_attack(WaNetConfig, WaNetPoisoner)
