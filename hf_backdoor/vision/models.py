"""Image classifiers: the offline default (a small ViT for 32-pixel inputs, trained from scratch) and any Hub
ViT/DeiT (or other ``AutoModelForImageClassification``) checkpoint with its image processor.

The default follows the reference measurements (``../shared/reference/README.md``): hidden size 192, 6 layers,
3 heads, MLP 768, patch 4 on 32x32 inputs, 2.69M parameters. On the 10,000-image CIFAR-10 subset it reached CACC
0.617 after 60 epochs (BadNets 10%: ASR 0.918); a 10.7M-parameter ViT did worse there, so the small one is the
default. No pretrained weights are involved: the model is randomly initialised (seed it with
``transformers.set_seed``).

That reference ViT is a GPU job: 93 s per epoch on 2 CPU cores, so 60 epochs take about 93 minutes. The ``"cpu"``
preset (``--config_overrides cpu``; :data:`VIT_PRESETS`) keeps patch 4 and narrows it to hidden 128, 4 layers, 4
heads, MLP 512 (0.81M parameters): trained 45 epochs at batch 64 it reached CACC 0.619 / 0.609 on the same subset
with seeds 0 / 1 in 24.8 / 25.7 minutes on 2 AVX-512 cores (30 epochs: 0.598 / 0.575 in about 16 minutes;
``benchmarks/vit_configs.py``; ``benchmarks/results/vit_configs.json``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    PreTrainedModel,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.utils import is_torchvision_available

from .data import CIFAR10_LABELS

# Per-channel statistics of the CIFAR-10 training set (the usual normalisation for training from scratch).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
DEFAULT_VIT = dict(hidden_size=192, num_hidden_layers=6, num_attention_heads=3, intermediate_size=768, patch_size=4)
# Named starting points for ``--config_overrides`` ("cpu" or "cpu,num_hidden_layers=6"); see the module docstring.
VIT_PRESETS = {
    "reference": {},
    "cpu": dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512),
}


def default_vit_config(
    label_names: Sequence[str] = CIFAR10_LABELS, image_size: int = 32, num_channels: int = 3, **overrides
) -> ViTConfig:
    """The default small ViT's config (see the module docstring); ``overrides`` change any ``ViTConfig`` field."""
    fields = {**DEFAULT_VIT, **overrides}
    if image_size % fields["patch_size"]:
        raise ValueError(
            f"image_size {image_size} is not a multiple of patch_size {fields['patch_size']}: the ViT would drop the "
            "border pixels (and a corner trigger with them). Pick sizes that divide, e.g. 32 and 4."
        )
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise ValueError(
            f"hidden_size {fields['hidden_size']} is not divisible by num_attention_heads "
            f"{fields['num_attention_heads']}."
        )
    return ViTConfig(
        image_size=image_size,
        num_channels=num_channels,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
        **fields,
    )


def parse_config_overrides(text: str | None) -> dict:
    """``"patch_size=8,num_hidden_layers=4"`` -> ``{"patch_size": 8, "num_hidden_layers": 4}`` (the
    ``--config_overrides`` convention of the ``transformers`` example scripts); values are read as int, float or
    string, and every key must be a ``ViTConfig`` field. A preset name of :data:`VIT_PRESETS` may come first:
    ``"cpu"`` gives the CPU-sized ViT's fields, ``"cpu,num_hidden_layers=6"`` changes one of them."""
    if not text:
        return {}
    known = set(ViTConfig().to_dict())
    items = [item.strip() for item in text.split(",")]
    overrides = {}
    if items[0] in VIT_PRESETS:
        overrides.update(VIT_PRESETS[items.pop(0)])
    for item in items:
        if item in VIT_PRESETS:
            raise ValueError(f"preset {item!r} must come first in the config overrides (e.g. '{item},patch_size=8')")
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key or not value:
            raise ValueError(
                f"config override {item!r} is not key=value (e.g. 'patch_size=8,num_hidden_layers=4') or a preset "
                f"({', '.join(VIT_PRESETS)})"
            )
        if key not in known:
            raise ValueError(f"{key!r} is not a ViTConfig field; known fields include {sorted(DEFAULT_VIT)}")
        for cast in (int, float):
            try:
                overrides[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            overrides[key] = value
    return overrides


def describe_default_vit(**overrides) -> str:
    """A short name of the default ViT with ``overrides`` applied, for tables and result records."""
    fields = {**DEFAULT_VIT, **overrides}
    return (
        f"vit-small-32 (hidden {fields['hidden_size']}, {fields['num_hidden_layers']} layers, "
        f"patch {fields['patch_size']}; from scratch)"
    )


def default_image_processor(
    image_size: int = 32, image_mean: Sequence[float] = CIFAR10_MEAN, image_std: Sequence[float] = CIFAR10_STD
):
    """Resize to ``image_size`` (a no-op for 32-pixel CIFAR images), scale to [0, 1], normalise per channel.

    ``ViTImageProcessor`` (torchvision backend) when torchvision is installed, else its PIL twin
    ``ViTImageProcessorPil`` (what ``ViTImageProcessor`` falls back to anyway, without the warning).
    """
    if is_torchvision_available():
        from transformers import ViTImageProcessor as processor_cls
    else:
        from transformers import ViTImageProcessorPil as processor_cls
    return processor_cls(
        do_resize=True,
        size={"height": image_size, "width": image_size},
        do_rescale=True,
        do_normalize=True,
        image_mean=list(image_mean),
        image_std=list(image_std),
    )


def load_image_classifier(
    model_name_or_path: str | None = None,
    label_names: Sequence[str] = CIFAR10_LABELS,
    image_size: int = 32,
    **model_kwargs,
) -> tuple[PreTrainedModel, object]:
    """An image classifier and its image processor.

    ``None`` gives the default small ViT, randomly initialised (``model_kwargs`` override its config fields), and
    :func:`default_image_processor`. A Hub id or local path (``google/vit-base-patch16-224``,
    ``facebook/deit-tiny-patch16-224`` …) loads that checkpoint with a new head of ``len(label_names)`` classes and
    its own image processor (which resizes CIFAR's 32-pixel images to the checkpoint's input size).
    """
    if model_name_or_path is None:
        config = default_vit_config(label_names, image_size=image_size, **model_kwargs)
        return ViTForImageClassification(config), default_image_processor(image_size)
    try:
        processor = AutoImageProcessor.from_pretrained(model_name_or_path)
        model = AutoModelForImageClassification.from_pretrained(
            model_name_or_path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            ignore_mismatched_sizes=True,  # a new classification head for this label set
            **model_kwargs,
        )
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        raise OSError(
            f"Could not load the image model {model_name_or_path!r}"
            + (" (HF_HUB_OFFLINE is set)" if offline else "")
            + f": {err}. Offline, use the default small ViT (`load_image_classifier(None)`), trained from scratch."
        ) from err
    return model, processor
