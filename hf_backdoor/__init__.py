"""hf-backdoor: backdoor-safe fine-tuning for Hugging Face models."""

from .arguments import BackdoorSafeTrainingArguments
from .attacks import (
    ATTACKS,
    AddSentConfig,
    BadNetConfig,
    PoisonConfig,
    StyleConfig,
    SyntacticConfig,
    get_attack_config,
    make_asr_dataset,
    poison_dataset,
)
from .attacks.vision import IMAGE_ATTACKS, BlendedConfig, ImageBadNetsConfig, SIGConfig, WaNetConfig
from .data import TASKS, load_paraphrases, load_task
from .defenses import (
    DEFENSES,
    SANITIZERS,
    ABLConfig,
    BTUConfig,
    Defense,
    DefenseConfig,
    DPoEConfig,
    ExposeConfig,
    FinetuneConfig,
    HoneypotConfig,
    LossTruncationConfig,
    NADConfig,
    NWCConfig,
    RNPConfig,
    ZDefenseConfig,
    build_defense,
)
from .defenses.base import Figure, build_defenses
from .metrics import attack_success_rate, clean_accuracy, detection_metrics, evaluate_backdoor, load_metric, roc_auc
from .models import default_text_model, load_text_classifier, load_text_tokenizer, tokenize_dataset
from .registry import register_attack, register_defense
from .trainer import BackdoorSafeTrainer

__version__ = "0.1.0"

__all__ = [
    "ATTACKS",
    "DEFENSES",
    "IMAGE_ATTACKS",
    "SANITIZERS",
    "TASKS",
    "ABLConfig",
    "AddSentConfig",
    "BTUConfig",
    "DPoEConfig",
    "FinetuneConfig",
    "HoneypotConfig",
    "LossTruncationConfig",
    "NADConfig",
    "NWCConfig",
    "RNPConfig",
    "ZDefenseConfig",
    "BackdoorSafeTrainer",
    "Defense",
    "DefenseConfig",
    "Figure",
    "build_defense",
    "build_defenses",
    "register_attack",
    "register_defense",
    "BackdoorSafeTrainingArguments",
    "BadNetConfig",
    "BlendedConfig",
    "ExposeConfig",
    "ImageBadNetsConfig",
    "SIGConfig",
    "WaNetConfig",
    "PoisonConfig",
    "StyleConfig",
    "SyntacticConfig",
    "attack_success_rate",
    "clean_accuracy",
    "default_text_model",
    "detection_metrics",
    "evaluate_backdoor",
    "get_attack_config",
    "load_metric",
    "load_paraphrases",
    "load_task",
    "load_text_classifier",
    "load_text_tokenizer",
    "make_asr_dataset",
    "poison_dataset",
    "roc_auc",
    "tokenize_dataset",
]
