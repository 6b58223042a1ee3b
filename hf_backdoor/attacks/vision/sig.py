"""SIG: a clean-label attack with a sinusoidal signal.

Barni, Kallas and Tondi, "A New Backdoor Attack in CNNs by Training Set Corruption Without Label Poisoning" (ICIP
2019): ``x' = clip(x + v)``, ``v(i, j) = delta * sin(2 pi j f / m)`` over the columns ``j`` of an image ``m`` pixels
wide, added to every channel; only images of the target class are poisoned and their labels are kept. The paper and
BackdoorBench use ``delta = 20``, ``f = 6``.

Deviations: none. ``mode`` defaults to ``"clean-label"`` (the attack's definition); ``"dirty"``/``"mix"`` are allowed
for experiments. ``test_delta`` can strengthen the signal on the ASR set (some follow-ups test with a larger delta);
it defaults to ``delta``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ...registry import register_attack
from .base import ImagePoisonConfig, ImagePoisoner, clip_uint8


@dataclass
class SIGConfig(ImagePoisonConfig):
    """SIG: a horizontal sinusoid of amplitude ``delta`` (0-255 scale) and ``frequency`` periods per image width."""

    mode: str = "clean-label"
    delta: float = 20.0
    frequency: float = 6.0
    test_delta: float | None = None

    name = "sig"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("delta", "test_delta"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 255:
                raise ValueError(f"{name} must be in (0, 255], got {value}.")
        if self.frequency <= 0:
            raise ValueError(f"frequency must be > 0, got {self.frequency}.")

    def signal(self, height: int, width: int, delta: float) -> np.ndarray:
        """The additive signal, float32 (height, width, 1)."""
        columns = np.arange(width, dtype=np.float64)
        row = delta * np.sin(2 * np.pi * columns * self.frequency / width)
        return np.broadcast_to(row[None, :, None], (height, width, 1)).astype(np.float32)


class SIGPoisoner(ImagePoisoner):
    config: SIGConfig

    def trigger(self, image: np.ndarray, index: int, salt: int) -> np.ndarray:
        delta = self.config.delta if salt == 0 or self.config.test_delta is None else self.config.test_delta
        return clip_uint8(image.astype(np.float32) + self.config.signal(image.shape[0], image.shape[1], delta))


register_attack(SIGConfig, SIGPoisoner)
