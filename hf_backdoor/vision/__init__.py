"""The image half of hf-backdoor: image tasks (CIFAR-10 packaged, Hub, ``.npz``, image folders), the default small
ViT and transforms. Image attacks live in ``hf_backdoor.attacks.vision``; defenses (ABL, CUL exposure) are shared with
the text models."""

from .data import CIFAR10_HUB_ID, CIFAR10_LABELS, image_stats, load_image_task, load_packaged_cifar10
from .models import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    DEFAULT_VIT,
    VIT_PRESETS,
    default_image_processor,
    default_vit_config,
    describe_default_vit,
    load_image_classifier,
    parse_config_overrides,
)
from .transforms import (
    ROW_INDEX,
    TRAINING_AUGMENTATION_KEY,
    ImageClassificationTransform,
    prepare_image_dataset,
    random_crop_flip,
    record_training_augmentation,
    recorded_training_augmentation,
)

__all__ = [
    "CIFAR10_HUB_ID",
    "CIFAR10_LABELS",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DEFAULT_VIT",
    "ROW_INDEX",
    "TRAINING_AUGMENTATION_KEY",
    "VIT_PRESETS",
    "ImageClassificationTransform",
    "default_image_processor",
    "default_vit_config",
    "describe_default_vit",
    "image_stats",
    "load_image_classifier",
    "load_image_task",
    "load_packaged_cifar10",
    "parse_config_overrides",
    "prepare_image_dataset",
    "random_crop_flip",
    "record_training_augmentation",
    "recorded_training_augmentation",
]
