"""Shared fixtures and factories: the offline environment, the packaged data, the MiniLM tokenizer, tiny random
models, training arguments and trainers.

Factories are plain functions, so test modules import them (``from tests.conftest import tiny_bert``), use them in
``pytest.mark.parametrize`` lists, and the scripts that the distributed tests launch use them too. Fixtures wrap
what is costly to build and shared across files (datasets, the tokenizer).
"""

import contextlib
import logging
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


# -- tiny models ------------------------------------------------------------------------------------------------------
def tiny_bert(seed=0, num_hidden_layers=2, max_position_embeddings=128, num_labels=2, dropout=None):
    """A random BERT classifier with MiniLM's vocabulary (so the real tokenizer's ids fit), hidden size 32.

    ``dropout=0.0`` turns off every dropout, for tests that compare two training runs step for step.
    """
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_position_embeddings,
        num_labels=num_labels,
    )
    if dropout is not None:
        config.hidden_dropout_prob = config.attention_probs_dropout_prob = dropout
    return BertForSequenceClassification(config)


def tiny_cifar_vit(seed=0):
    """The default ViT's architecture shrunk to hidden size 32 and one layer: 32x32 images, the ten CIFAR-10
    classes."""
    import torch
    from transformers import ViTForImageClassification

    from hf_backdoor.vision import default_vit_config

    torch.manual_seed(seed)
    config = default_vit_config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    return ViTForImageClassification(config)


# -- training arguments and trainers ------------------------------------------------------------------------------------
def training_args(output_dir, cls=None, **overrides):
    """``TrainingArguments`` (or ``cls``, e.g. ``BackdoorSafeTrainingArguments``) for short CPU runs: batch 32, two
    epochs, seed 0, a log line every step, no checkpoints, no reporting, no progress bars."""
    from transformers import TrainingArguments

    fields = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=32,
        num_train_epochs=2,
        learning_rate=1e-3,
        seed=0,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    fields.update(overrides)
    return (cls or TrainingArguments)(**fields)


def text_trainer(output_dir, train_dataset, tokenizer, *, cls=None, model=None, args=None, args_cls=None, **kwargs):
    """A trainer (``BackdoorSafeTrainer`` unless ``cls`` says otherwise) on a tokenized text set, with a fresh
    :func:`tiny_bert` unless ``model`` is given. ``args`` are :func:`training_args` overrides; the remaining keyword
    arguments go to the trainer (``defense=...``, ``eval_dataset=...``)."""
    from transformers import DataCollatorWithPadding

    from hf_backdoor.trainer import BackdoorSafeTrainer

    return (cls or BackdoorSafeTrainer)(
        model=tiny_bert() if model is None else model,
        args=training_args(output_dir, args_cls, **(args or {})),
        train_dataset=train_dataset,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        **kwargs,
    )


def poisoned_text_rows(rows, rate=0.2, trigger="cf", **attack):
    """``rows`` with a one-word BadNet trigger at ``rate``: a trigger a tiny random BERT learns in a few epochs."""
    from hf_backdoor import BadNetConfig, poison_dataset

    return poison_dataset(rows, BadNetConfig(triggers=(trigger,), poison_rate=rate, **attack))


@contextlib.contextmanager
def registered(config_class, defense_class):
    """Register a defense for one test and remove it afterwards, so no other test sees it."""
    from hf_backdoor.registry import DEFENSES, register_defense

    register_defense(config_class, defense_class)
    try:
        yield
    finally:
        DEFENSES.pop(config_class.name, None)


# -- data and tokenizer fixtures ----------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def sst2():
    from hf_backdoor import load_task

    return load_task("sst2")


@pytest.fixture(scope="session")
def sst2_train_slice(sst2):
    # A fixed real slice keeps attack tests fast; 1,000 rows leave enough of each label for every mode.
    return sst2["train"].select(range(1000))


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    from hf_backdoor import default_text_model

    return AutoTokenizer.from_pretrained(default_text_model())


@pytest.fixture(scope="session")
def tiny_train(sst2, tokenizer):
    """256 real SST-2 training rows, 20% of them poisoned with the BadNet word "cf", tokenized to 64 tokens."""
    from hf_backdoor import tokenize_dataset

    return tokenize_dataset(poisoned_text_rows(sst2["train"].select(range(256))), tokenizer, max_length=64)


@pytest.fixture(scope="session")
def clean_rows(sst2, tokenizer):
    """100 real validation rows (both classes), tokenized: the defender's small clean set for post-training
    repairs."""
    from hf_backdoor import tokenize_dataset

    return tokenize_dataset(sst2["validation"].select(range(100)), tokenizer, max_length=48)


@pytest.fixture(scope="session")
def cifar():
    """The packaged CIFAR-10 copy (2,000 training and 500 test images)."""
    from hf_backdoor.vision import load_image_task

    return load_image_task("cifar10")


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-model tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    they gain nothing from threads, and on a shared machine idle OpenMP threads only burn CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def warnings_log(caplog):
    caplog.set_level(logging.WARNING, logger="hf_backdoor")
    return caplog
