"""BTU: Backdoor Token Unlearning, run during supervised fine-tuning.

Jiang et al., "Backdoor Token Unlearning: Exposing and Defending Backdoors in Pretrained Language Models",
AAAI 2025; official code XDJPH/Backdoor-Token-Unlearning.

The paper's procedure (``BTUConfig.paper()``):

1. Round 1: a proxy made of the model's word-embedding block, mean-pooled, feeding a fresh linear head, trained for
   one epoch on the training data (official: AdamW lr 2e-5, batch 256, max length 128). Each vocabulary id is scored
   by the L2 norm of its embedding row's change.
2. Round 2: the round-1 top tokens are removed from the texts and a fresh proxy is trained and scored again.
3. Round 3: the full model with only the word embeddings trainable, one epoch, scored the same way.
4. Suspicious set: the union of the three top-K lists. The official K is ``int(0.0005 * 35022) = 17`` with a constant
   that is not BERT's vocabulary size; here K is ``top_k`` or ``top_k_fraction`` of the real vocabulary, and the
   tokenizer's special tokens are excluded by their ids.
5. Normal fine-tuning of the full model.
6. Fine-grained unlearning: ``c = ||E - E0||_F / V``; every entry of a suspicious token's row whose change is
   ``>= c`` is overwritten with the pretrained padding embedding's entry.
7. The official code then fine-tunes one more epoch on clean data. Not done here (it needs data the defender is
   assumed not to have); the report says so.

Where this implementation deviates by default, and why (each measured in ``benchmarks/results/``, see the README):

- Round 3 is read from the real training (``round3="training"``) at the end of each epoch instead of a separate
  embedding-only epoch: the same signal at no extra cost, and detection runs again at every epoch's end (a trigger
  the model learns late, e.g. one of five BadNet words on a small set, is caught at a later epoch).
- Selection (``selection="flip_test"``): the published union flags punctuation, stop words and task words (on HSOL
  the offensive words that decide the task). A candidate is kept only if deleting it (with the candidates that
  co-occur with it in >= ``cooccurrence`` of its rows) flips the current model's prediction on >= ``flip_threshold``
  of the training rows that contain it. Triggers flip most of their rows; task words rarely do. Each candidate is
  first judged on ``flip_screen_rows`` of its sampled rows, and on the rest only if it flipped at least half of
  ``flip_threshold`` there: most candidates flip nothing, and testing each in full was most of BTU's added time.
- The flip rate is taken over the rows the model currently gives the candidate's majority training label
  (``flip_basis="decided"``): a backdoor that only partly took puts some of its rows on the target label and leaves
  the rest, and its deletion flips what it decides, not the rest. On AG News BadNet (seed 1) the rate over all rows
  was 0.31-0.74 at the last epoch and flagged one of the five trigger words; over the decided rows, 0.71-0.87, all
  five. A task word's rows are nearly all on its label, so its rate barely moves.
- A candidate that reaches the flip threshold is spared as a task word (``task_word_test``) when two tests agree:
  replacing it with its nearest pretrained-embedding neighbours keeps most of the predictions its deletion flips
  (the model reads a meaning the neighbours share; a trigger is a key of that one token), and a linear probe on the
  *pretrained* model's features, fit on rows without such candidates, already moves rows towards the candidate's label
  when it is present (the pretrained model knew the word's meaning; it knew nothing of a planted trigger). On HSOL
  the flip test alone flagged ``bitch``, and unlearning it cost 16 points of clean accuracy. A piece of a longer
  word (HSOL's slur ``##gger``) has spelling fragments for neighbours, so the probe alone judges it.
- A candidate is also flagged, whatever its flip rate, when its rows are labelled against their content
  (``mislabel_test``): nearly all of them carry one label, yet a linear probe on the *pretrained* model's features,
  fit on the training rows without the candidate, gives that label less than even odds on average over them and
  significantly less than it gives the label's other rows. Dirty-label trigger rows were written for another label
  and the pretrained model knows nothing of the trigger, so they read as their source label however well the model
  under training has memorised them. At 3% BadNet on SST-2 the model memorised the 60 rows and deleting a trigger
  flipped 0-67% of them (the flip test flagged one word of five on seed 1, none on seed 0); the held-out probe gave
  their label 0.20-0.38 against 0.72 on the label's other rows (README). The rows of a flagged token that the
  test reads as mislabelled are isolated with the label their text reads as, also where the flip test flagged the
  token and deleting it does not flip them (memorised rows, or the rest of an inserted sentence). It cannot see
  clean-label triggers, whose rows read as their label.
- After detection the flagged tokens' embedding rows are reset at once (and again at the end), and the remaining
  epochs unlearn the backdoor instead of re-learning it (``isolated_rows="relabel"``): the rows whose prediction
  the flagged tokens decide keep their trigger but train on the label the model gives them without it, while the
  flagged tokens are stripped from every other row (``strip_flagged_tokens``). A reset embedding alone leaves part
  of the backdoor in the layers learned during the first epoch (resetting to the token's own pretrained embedding
  brings the backdoor back: README, "BackdoorSafeTrainer and BTU"); masking the isolated rows out of the loss
  (``"mask"``) removes the signal but does not unlearn it.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from ._shared.tokens import (
    continuation_ids,
    fit_softmax_probe,
    insert_span,
    length_batches,
    pad_batch,
    pooled_features,
    strip_token_ids,
    word_span,
)
from .base import Defense, DefenseConfig, register_defense

logger = logging.getLogger(__name__)

ROUND3_MODES = ("training", "embedding_only", "none")
SELECTIONS = ("flip_test", "union")
UNLEARNING = ("fine_grained", "none")
ISOLATED_ROWS = ("relabel", "mask", "none")
RESET_TARGETS = ("padding", "pretrained")
FLIP_BASES = ("all", "decided")
CONSOLE_SUMMARY_ROWS = 15  # candidates listed by console_summary, highest flip rate first


@dataclass
class BTUConfig(DefenseConfig):
    """Backdoor Token Unlearning. Defaults are the improved procedure; ``BTUConfig.paper()`` is the published one.

    Args:
        top_k: tokens kept per exposure round (overrides ``top_k_fraction``).
        top_k_fraction: tokens kept per round as a fraction of the vocabulary (0.0005: 15 of BERT's 30,522).
        proxy_rounds: exposure rounds on the embedding proxy (the paper: 2).
        proxy_learning_rate, proxy_batch_size, proxy_epochs, proxy_max_length: the proxy's training (official values).
        round3: ``"training"`` (drift of the real model at the end of its epochs), ``"embedding_only"`` (the paper: a
            separate epoch of the full model with only word embeddings trainable) or ``"none"``.
        redetect_each_epoch: with ``round3="training"``, detect again at every epoch's end (a trigger learned
            late is still caught); otherwise only after the first epoch.
        round3_learning_rate: learning rate of the ``"embedding_only"`` round.
        selection: ``"flip_test"`` (keep candidates whose deletion flips predictions) or ``"union"`` (the paper).
        flip_threshold: minimum flip rate of a trigger token.
        flip_basis: the rows a flip rate is taken over: ``"all"`` (every sampled row with the candidate) or
            ``"decided"`` (only those the model currently gives the candidate's majority training label, the rows
            the candidate can be deciding; over all rows where fewer than ``flip_min_decided_rows`` are). A trigger
            the model has learned on only some of its rows flips what it decides, not the rest.
        flip_min_decided_rows: with ``flip_basis="decided"``, the decided rows a candidate needs to be judged on them.
        insertion_test: also insert each candidate (with its co-occurring group) into rows that do not contain it
            and that the model assigns another label, and take the larger of the two flip rates: a trigger flips
            rows it was never trained on, even where a model that fit its own rows keeps them on the target label
            without it; the catch for a clean-label trigger, whose own rows are on its label either way. A candidate
            only insertion takes past the cut is spared when the pretrained probe reads it as a task word (below).
            Off by default: it also flags task words the pretrained model does not know (HSOL's slang `ho`), at a
            CACC cost (see the README).
        task_word_test: spare a candidate that reaches ``flip_threshold`` when it reads as a task word by two
            tests that must agree: substituting its nearest pretrained-embedding neighbours flips at most
            ``task_word_neighbour_ratio`` of the share its deletion flips, and a linear probe on the pretrained
            model's mean-pooled features moves rows at least ``task_word_prior_shift`` (log-probability) towards the
            candidate's label when it is in them. A candidate only the insertion test took past the cut is judged by
            the probe alone, on the rows it was inserted into, and so is a piece of longer words in most of its rows
            (``##gger``), whose neighbours are spelling fragments.
        task_word_neighbour_ratio, task_word_prior_shift: the two tests' bounds.
        mislabel_test: also flag a candidate whose rows are labelled against their content: at least
            ``mislabel_min_rows`` rows, at least ``mislabel_min_purity`` of them on one label, to which a linear probe
            on the pretrained model's features (fit on the training rows without the candidate) gives less than
            ``mislabel_max_label_prob`` on average, and significantly less than out-of-fold on the label's other
            rows (one-sided z-test, Bonferroni over the tested candidates at ``mislabel_alpha``). Needs the
            pretrained copy the task-word test uses; does not see clean-label triggers.
        mislabel_min_rows, mislabel_min_purity, mislabel_max_label_prob, mislabel_alpha: the test's bounds.
        task_word_neighbours: pretrained neighbours a substituted token is drawn from (seeded).
        task_word_probe_rows: training rows (a seeded sample) the pretrained probe is fit on.
        flip_max_rows: rows per candidate in the flip test (seeded sample).
        predict_batch_size: rows per forward pass of the detection tests (length-sorted batches; the pretrained
            copy's features of a row are computed once per run).
        flip_min_rows: candidates in fewer training rows are not judged (too little evidence) and not flagged.
        cooccurrence: candidates present in at least this share of a candidate's rows are deleted together with it
            (multi-token triggers such as AddSent's sentence).
        strip_flagged_tokens: remove flagged tokens from the training rows that are not isolated, after detection.
        isolated_rows: what later epochs do with the rows whose prediction the flagged tokens decide (the flip
            test's isolated rows): ``"relabel"`` (keep the trigger, train on the model's prediction without it, so
            the backdoor is unlearned), ``"mask"`` (leave them out of the loss) or ``"none"`` (train them as
            they are, with their flagged tokens stripped).
        unlearning: ``"fine_grained"`` (the paper's reset) or ``"none"`` (detection only).
        reset_to: what a reset entry gets: ``"padding"`` (the pretrained padding embedding, the paper) or
            ``"pretrained"`` (the token's own pretrained entry: the trigger word as a clean model would see it).
        seed: seeds proxy heads and flip-test samples.
    """

    top_k: int | None = field(
        default=None, metadata={"help": "tokens kept per exposure round (overrides `top_k_fraction`)."}
    )
    top_k_fraction: float = field(
        default=0.0005,
        metadata={"help": "tokens kept per round as a fraction of the vocabulary (0.0005: 15 of BERT's 30,522)."},
    )
    proxy_rounds: int = field(default=2, metadata={"help": "exposure rounds on the embedding proxy (the paper: 2)."})
    proxy_learning_rate: float = field(
        default=2e-5, metadata={"help": "AdamW learning rate of the embedding proxy (official 2e-5)."}
    )
    proxy_batch_size: int = field(
        default=256, metadata={"help": "Batch size of the embedding proxy's training (official 256)."}
    )
    proxy_epochs: int = field(default=1, metadata={"help": "Epochs of each proxy round (official 1)."})
    proxy_max_length: int = field(default=128, metadata={"help": "Tokens per row the proxy reads (official 128)."})
    round3: str = field(
        default="training",
        metadata={
            "help": '`"training"` (drift of the real model at the end of its epochs), `"embedding_only"` (the paper: a separate epoch of the full model with only word embeddings trainable) or `"none"`.'
        },
    )
    redetect_each_epoch: bool = field(
        default=True,
        metadata={
            "help": 'with `round3="training"`, detect again at every epoch\'s end (a trigger learned late is still caught); otherwise only after the first epoch.'
        },
    )
    round3_learning_rate: float = field(
        default=2e-5, metadata={"help": 'learning rate of the `"embedding_only"` round.'}
    )
    selection: str = field(
        default="flip_test",
        metadata={"help": '`"flip_test"` (keep candidates whose deletion flips predictions) or `"union"` (the paper).'},
    )
    flip_threshold: float = field(default=0.65, metadata={"help": "minimum flip rate of a trigger token."})
    flip_basis: str = field(
        default="decided",
        metadata={
            "help": 'the rows a flip rate is taken over: `"all"` (every sampled row with the candidate) or '
            '`"decided"` (only those the model currently gives the candidate\'s majority training label, the rows it '
            "can be deciding; over all rows where fewer than `flip_min_decided_rows` are): a trigger the model has "
            "learned on only some of its rows flips what it decides, not the rest."
        },
    )
    flip_min_decided_rows: int = field(
        default=8,
        metadata={
            "help": 'with `flip_basis="decided"`, the decided rows a candidate needs to be judged on them (2 of 3 '
            "rows is no evidence); with fewer its flip rate is taken over all its rows."
        },
    )
    insertion_test: bool = field(
        default=False,
        metadata={
            "help": "also insert each candidate into rows without it that the model gives another label, and take "
            "the larger flip rate (deletion or insertion): a trigger flips rows it was never trained on, even where "
            "a model that fit its own rows keeps them on the target label without it (a clean-label trigger's "
            "rows are on its label either way). A candidate only insertion takes past the cut is spared when the "
            "pretrained probe moves the rows it is inserted into towards its label by `task_word_prior_shift`. Off by "
            "default: it also flags task words the pretrained model does not know (HSOL's slang `ho`), at a CACC cost."
        },
    )
    task_word_test: bool = field(
        default=True,
        metadata={
            "help": "spare a candidate that reaches `flip_threshold` when two tests agree that it is a task word: "
            "substituting its nearest pretrained-embedding neighbours flips at most `task_word_neighbour_ratio` of "
            "what its deletion flips (a task word's meaning is shared by its neighbours; a trigger is a key of that "
            "one token), and a linear probe on the pretrained model's features, fit on rows without such candidates, "
            "moves its rows at least `task_word_prior_shift` towards the candidate's label (the pretrained model knew "
            "the word, not a planted trigger); one only the insertion test took past the cut, by the probe alone on "
            "the rows it was inserted into, and a piece of longer words (`##gger`, whose neighbours are spelling "
            "fragments) by the probe alone. Needs a copy of the pretrained model during training; a run resumed "
            "from a checkpoint cannot make one and skips the test."
        },
    )
    task_word_neighbour_ratio: float = field(
        default=0.5,
        metadata={"help": "a task word's neighbours flip at most this share of what its deletion flips."},
    )
    task_word_prior_shift: float = field(
        default=0.3,
        metadata={
            "help": "a task word moves the pretrained probe's log-probability of its label by at least this much."
        },
    )
    mislabel_test: bool = field(
        default=True,
        metadata={
            "help": "also flag a candidate whose training rows are labelled against their content: nearly all carry "
            "one label, yet a linear probe on the pretrained model's features, fit on the training rows without the "
            "candidate, gives that label less than `mislabel_max_label_prob` on average over them and significantly "
            "less than out-of-fold on the label's other rows (one-sided z-test, Bonferroni at `mislabel_alpha`). "
            "Dirty-label trigger rows read as the label they were written for, however well the model under "
            "training has memorised them; clean-label triggers are not seen. Needs the pretrained copy the task-word "
            "test uses (skipped on a run resumed from a checkpoint)."
        },
    )
    mislabel_min_rows: int = field(
        default=5, metadata={"help": "candidates in fewer training rows are not judged by the mislabel test."}
    )
    mislabel_min_purity: float = field(
        default=0.9,
        metadata={"help": "the share of a candidate's rows on its majority label for the mislabel test to judge it."},
    )
    mislabel_max_label_prob: float = field(
        default=0.5,
        metadata={
            "help": "the held-out probe's mean probability of the rows' label must be below this (the rows read, on "
            "average, as another label)."
        },
    )
    mislabel_alpha: float = field(
        default=0.01,
        metadata={"help": "family-wise significance of the mislabel test (Bonferroni over the tested candidates)."},
    )
    task_word_neighbours: int = field(
        default=8, metadata={"help": "nearest pretrained-embedding neighbours a substitute is drawn from."}
    )
    task_word_probe_rows: int = field(
        default=2000, metadata={"help": "training rows (seeded sample) the pretrained probe is fit on."}
    )
    flip_max_rows: int = field(default=64, metadata={"help": "rows per candidate in the flip test (seeded sample)."})
    predict_batch_size: int = field(
        default=64,
        metadata={
            "help": "rows per forward pass in the detection tests (length-sorted batches). 64 predicted 1.27x as many "
            "HSOL rows per second as 256 on the 2-core CPU (benchmarks/detection_speed.py: less padding, activations "
            "that stay in cache); a GPU wants more."
        },
    )
    flip_screen_rows: int = field(
        default=16,
        metadata={
            "help": "the flip test judges every candidate on the first this many of its sampled rows and goes on to "
            "all `flip_max_rows` only for those that flip at least half of `flip_threshold` there (most candidates "
            "flip none: the full test of each was most of BTU's added time); 0 tests every candidate in full."
        },
    )
    flip_min_rows: int = field(
        default=3,
        metadata={"help": "candidates in fewer training rows are not judged (too little evidence) and not flagged."},
    )
    cooccurrence: float = field(
        default=0.8,
        metadata={
            "help": "candidates present in at least this share of a candidate's rows are deleted together with it (multi-token triggers such as AddSent's sentence)."
        },
    )
    strip_flagged_tokens: bool = field(
        default=True,
        metadata={"help": "remove flagged tokens from the training rows that are not isolated, after detection."},
    )
    isolated_rows: str = field(
        default="relabel",
        metadata={
            "help": 'what later epochs do with the rows whose prediction the flagged tokens decide (the flip test\'s isolated rows): `"relabel"` (keep the trigger, train on the model\'s prediction without it, so the backdoor is unlearned), `"mask"` (leave them out of the loss) or `"none"` (train them as they are, with their flagged tokens stripped).'
        },
    )
    unlearning: str = field(
        default="fine_grained", metadata={"help": '`"fine_grained"` (the paper\'s reset) or `"none"` (detection only).'}
    )
    reset_to: str = field(
        default="padding",
        metadata={
            "help": 'what a reset entry gets: `"padding"` (the pretrained padding embedding, the paper) or `"pretrained"` (the token\'s own pretrained entry: the trigger word as a clean model would see it).'
        },
    )
    seed: int = field(default=0, metadata={"help": "seeds proxy heads and flip-test samples."})

    name = "btu"
    title = "BTU (Backdoor Token Unlearning)"
    citation = "Jiang et al., AAAI 2025"

    def __post_init__(self) -> None:
        self._check_at_least(1, "top_k", optional=True)
        self._check_interval("(0, 0.1)", "top_k_fraction")
        if self.proxy_rounds not in (0, 1, 2):
            raise ValueError(f"proxy_rounds must be 0, 1 or 2, got {self.proxy_rounds}.")
        self._check_positive("proxy_learning_rate", "round3_learning_rate")
        self._check_at_least(
            1,
            "proxy_batch_size",
            "proxy_epochs",
            "proxy_max_length",
            "flip_max_rows",
            "predict_batch_size",
            "flip_min_rows",
            "flip_min_decided_rows",
            "task_word_neighbours",
            "task_word_probe_rows",
            "mislabel_min_rows",
        )
        self._check_interval("[0, 1]", "task_word_neighbour_ratio")
        self._check_interval("(0, 1]", "mislabel_min_purity", "mislabel_max_label_prob")
        self._check_interval("(0, 1)", "mislabel_alpha")
        self._check_choice("round3", ROUND3_MODES)
        self._check_choice("selection", SELECTIONS)
        self._check_choice("unlearning", UNLEARNING)
        self._check_choice("isolated_rows", ISOLATED_ROWS)
        self._check_choice("reset_to", RESET_TARGETS)
        self._check_choice("flip_basis", FLIP_BASES)
        self._check_interval("(0, 1]", "flip_threshold", "cooccurrence")
        self._check_at_least(0, "flip_screen_rows")
        if self.selection == "flip_test" and self.round3 != "training":
            raise ValueError(
                "selection='flip_test' needs a model that has seen the data: use round3='training', "
                "or selection='union' for the published procedure."
            )
        if self.proxy_rounds == 0 and self.round3 == "none":
            raise ValueError("With proxy_rounds=0 and round3='none' nothing would be scored.")
        if self.isolated_rows != "none" and self.selection != "flip_test":
            self.isolated_rows = "none"  # isolation reuses the flip test's predictions

    def detection_only(self) -> BTUConfig:
        """This config without the embedding reset: what ``hf-backdoor scan`` runs (it keeps no model). The isolated
        rows are still found (the scan compares them with the ground truth)."""
        return dataclasses.replace(self, unlearning="none")

    @classmethod
    def paper(cls, **overrides) -> BTUConfig:
        """The published procedure: three exposure rounds (round 3 a separate embedding-only epoch), the union of
        the top-K lists, no stripping or isolation, fine-grained unlearning after training."""
        fields = dict(round3="embedding_only", selection="union", strip_flagged_tokens=False, isolated_rows="none")
        fields.update(overrides)
        return cls(**fields)


class EmbeddingProxy(nn.Module):
    """BTU's exposure proxy: a copy of the word embeddings, mean-pooled over real tokens, and a fresh linear head."""

    def __init__(self, embeddings: torch.Tensor, num_labels: int):
        super().__init__()
        self.embeddings = nn.Embedding.from_pretrained(embeddings.clone(), freeze=False)
        self.head = nn.Linear(embeddings.shape[1], num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mask = attention_mask.unsqueeze(-1).to(self.embeddings.weight.dtype)
        pooled = (self.embeddings(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.head(pooled)


class BTUDefense(Defense):
    config: BTUConfig
    needs_row_ids = True  # isolated rows are recognised by their row id, not their token ids (duplicates differ)
    limitations = (
        "- BTU finds token triggers (rare words, inserted sentences). Syntactic and style (paraphrase) triggers "
        "are not tokens: BTU does not remove them; stack a sample-level defense for those.",
    )

    @property
    def owns_loss(self) -> bool:
        # Only masking isolated rows needs a loss of its own; relabelling and stripping rewrite the batch.
        return self.config.isolated_rows == "mask"

    def __init__(self, config: BTUConfig):
        super().__init__(config)
        self.initial_embeddings: torch.Tensor | None = None
        self.rounds: list[dict[str, Any]] = []
        self.candidates: list[int] = []
        self.flip_rates: dict[int, float] = {}
        self.flip_support: dict[int, int] = {}
        self.flip_tested_rows: dict[int, int] = {}  # rows the deletion test judged (fewer when screened out)
        self.flip_decided_rows: dict[int, int] = {}  # of those, the rows predicted as the candidate's majority label
        self.deletion_rates: dict[int, float] = {}
        self.insertion_rates: dict[int, float] = {}
        # token -> (its label, the host rows its group was inserted into and judged on, the span, the positions)
        self._insertions: dict[int, tuple[int, list[int], list[int], list[int]]] = {}
        self.task_word_scores: dict[int, dict[str, Any]] = {}  # token -> its latest task-word test
        self.task_word_skipped: str | None = None
        self.mislabel_scores: dict[int, dict[str, Any]] = {}  # token -> its latest mislabel test
        self.flagged_by: dict[int, str] = {}  # token -> the test that flagged it
        self.mislabel_skipped: str | None = None
        self._mislabel_relabels: dict[int, dict[int, int]] = {}  # flagged token -> {row: the label its text reads as}
        self._prior_cache: dict[tuple[int, ...], torch.Tensor] = {}  # token-id row -> its pretrained features
        self._prior_model: nn.Module | None = None  # the pretrained model, for the task-word test's probe
        self._probe_rows: np.ndarray | None = None
        self._probe_features: torch.Tensor | None = None
        self._unit_embeddings: torch.Tensor | None = None
        self._vocab_names: list[str] | None = None
        self.flagged: list[int] = []
        self.flagged_in_round: dict[int, str | None] = {}  # token -> the exposure round after which it was flagged
        self.isolated_row_indices: list[int] = []
        self.isolated_row_labels: list[int] = []  # the model's prediction for each isolated row without its trigger
        self.isolated_rows: dict[int, int] = {}  # derived: row position -> label, for batches
        self.detection_done = False
        self.timings: dict[str, float] = {}
        self.num_isolated_seen = 0
        self._tokenizer = None
        self._continuing: set[int] | None = None  # the vocabulary's continuation pieces (made once)

    # ----------------------------------------------------------------------------------------------- hooks
    def check_trainer(self, trainer) -> None:
        _word_embeddings(trainer.accelerator.unwrap_model(trainer.model))  # a model without word embeddings fails here

    def on_train_begin(self, trainer) -> None:
        model = trainer.accelerator.unwrap_model(trainer.model)
        embedding = _word_embeddings(model)
        self._tokenizer = trainer.processing_class
        self.pad_id = _pad_id(trainer, model)
        self.special_ids = set(getattr(trainer.processing_class, "all_special_ids", None) or [self.pad_id])
        self.vocab_size = embedding.weight.shape[0]
        self.k = self.config.top_k or max(1, int(self.config.top_k_fraction * self.vocab_size))
        fresh = self.initial_embeddings is None  # a resumed run restores it from the checkpoint instead
        if fresh:
            self.initial_embeddings = embedding.weight.detach().float().cpu().clone()
        self.train_ids = _training_input_ids(trainer)
        probes = (self.config.task_word_test or self.config.mislabel_test) and self.config.selection == "flip_test"
        needs_labels = self.config.insertion_test or probes or self.config.flip_basis == "decided"
        self.train_labels = _training_labels(trainer) if needs_labels else None
        if probes and trainer.is_world_process_zero():
            if fresh:
                self._prior_model = copy.deepcopy(model).eval().requires_grad_(False)
            else:
                self.task_word_skipped = "resumed from a checkpoint: no pretrained model to probe"
        if not embedding.weight.requires_grad and self.config.proxy_rounds == 0:
            raise ValueError(
                "The model's word embeddings are frozen (e.g. LoRA without embedding adapters), so they cannot "
                "drift, and proxy_rounds=0 leaves nothing to score: use proxy_rounds >= 1, or make the embeddings "
                "trainable (peft: modules_to_save=['word_embeddings'])."
            )
        if self.detection_done:  # resumed: rebuild the row keys from the restored indices
            self._index_isolated_rows()
            return
        if trainer.is_world_process_zero():
            # Detection must not consume the training's random numbers: with nothing flagged, the defended run
            # then trains exactly like the plain one.
            with torch.random.fork_rng(devices=[]):
                self._expose(trainer, model)
        self._sync(trainer)
        if self.config.round3 != "training":
            self._select(trainer, model)

    def _expose(self, trainer, model) -> None:
        """Exposure rounds that need no trained model: the proxy rounds and the paper's embedding-only round."""
        start = time.perf_counter()
        removed: set[int] = set()
        for round_index in range(self.config.proxy_rounds):
            drift = self._proxy_round(trainer, model, removed)
            top = self._top_k(drift, exclude=removed)
            self.rounds.append(self._round_record(f"proxy_{round_index + 1}", drift, top))
            removed |= set(top)
        self.timings["proxy_rounds_s"] = time.perf_counter() - start
        if self.config.round3 == "embedding_only":
            start = time.perf_counter()
            drift = self._embedding_only_round(trainer, model)
            self.rounds.append(self._round_record("embedding_only", drift, self._top_k(drift)))
            self.timings["round3_s"] = time.perf_counter() - start

    def on_epoch_end(self, trainer) -> None:
        if self.config.round3 != "training" or (self.detection_done and not self.config.redetect_each_epoch):
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        epoch = max(1, round(trainer.state.epoch or 0))
        weight = _word_embeddings(model).weight
        # Frozen embeddings (e.g. LoRA without embedding adapters) do not drift: the proxy rounds' candidates are
        # judged by the flip test alone.
        if trainer.is_world_process_zero() and weight.requires_grad:
            start = time.perf_counter()
            drift = self._drift(weight)
            self.rounds.append(self._round_record(f"epoch_{epoch}", drift, self._top_k(drift)))
            self.timings["round3_s"] = self.timings.get("round3_s", 0.0) + time.perf_counter() - start
        self._sync(trainer)
        self._select(trainer, model)
        if self.flagged and self.config.unlearning != "none":
            self._unlearn(model)  # the remaining epochs start from reset trigger rows

    def prepare_inputs(self, trainer, inputs: dict) -> dict:
        if not self.detection_done or not self.flagged:
            return inputs
        device = inputs["input_ids"].device
        isolated = torch.zeros(inputs["input_ids"].shape[0], dtype=torch.bool, device=device)
        if self.isolated_rows and self.config.isolated_rows != "none":
            labels = [self.isolated_rows.get(position) for position in trainer.row_positions(trainer.batch_row_ids)]
            isolated = torch.tensor([label is not None for label in labels], device=device)
            self.num_isolated_seen += int(isolated.sum())
            if self.config.isolated_rows == "mask":
                inputs = {**inputs, "btu_keep": ~isolated}
            elif isolated.any():
                corrected = torch.tensor([-1 if label is None else label for label in labels], device=device)
                inputs = {**inputs, "labels": torch.where(isolated, corrected, inputs["labels"])}
        if self.config.strip_flagged_tokens:
            # Relabelled rows keep their trigger: seeing it with the right label is what unlearns the backdoor.
            keep_rows = isolated if self.config.isolated_rows == "relabel" else None
            inputs = strip_token_ids(inputs, torch.tensor(self.flagged), self.pad_id, keep_rows=keep_rows)
        return inputs

    def compute_loss(self, trainer, model, inputs: dict, return_outputs: bool = False):
        keep = inputs.pop("btu_keep", None)
        if keep is None:
            return None
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        per_row = nn.functional.cross_entropy(outputs.logits.float(), labels, reduction="none")
        # Masking (not dropping) rows keeps every process's backward identical under DDP.
        loss = (per_row * keep).sum() / keep.sum().clamp(min=1)
        return (loss, outputs) if return_outputs else loss

    def on_train_end(self, trainer) -> None:
        if not self.detection_done:  # training shorter than one epoch: detect on what was trained
            self.on_epoch_end(trainer)
        # The pretrained copy and its features serve the task-word and mislabel tests only, not after training.
        self._prior_model = self._probe_features = None
        self._prior_cache = {}
        model = trainer.accelerator.unwrap_model(trainer.model)
        if self.flagged and self.config.unlearning != "none":
            start = time.perf_counter()
            self._unlearn(model)
            self.timings["unlearning_s"] = self.timings.get("unlearning_s", 0.0) + time.perf_counter() - start

    # ------------------------------------------------------------------------------------- exposure rounds
    def _drift(self, weight: torch.Tensor) -> np.ndarray:
        return (weight.detach().float().cpu() - self.initial_embeddings).norm(dim=1).numpy()

    def _top_k(self, drift: np.ndarray, exclude: set[int] = frozenset()) -> list[int]:
        masked = drift.copy()
        masked[list(self.special_ids | set(exclude))] = -np.inf
        top = np.argsort(-masked, kind="stable")[: self.k]
        return [int(t) for t in top if np.isfinite(masked[t])]

    def _round_record(self, name: str, drift: np.ndarray, top: list[int]) -> dict:
        # A log-scale histogram of every ordinary token's score keeps the report small but shows how far the
        # flagged tokens stand out from the vocabulary.
        ordinary = np.delete(drift, sorted(self.special_ids))
        counts, edges = np.histogram(np.log10(ordinary + 1e-12), bins=40)
        return {
            "round": name,
            "top_ids": top,
            "top_scores": [float(drift[t]) for t in top],
            "score_histogram": {"log10_edges": [round(float(e), 4) for e in edges], "counts": counts.tolist()},
        }

    def _proxy_round(self, trainer, model, removed: set[int]) -> np.ndarray:
        cfg = self.config
        device = trainer.args.device
        generator = torch.Generator().manual_seed(cfg.seed + len(self.rounds))
        torch.manual_seed(cfg.seed + len(self.rounds))
        proxy = EmbeddingProxy(self.initial_embeddings, model.config.num_labels).to(device)
        optimizer = torch.optim.AdamW(proxy.parameters(), lr=cfg.proxy_learning_rate)
        labels = torch.tensor(_training_labels(trainer))
        drop = torch.tensor(sorted(removed), dtype=torch.long)
        rows = [ids[: cfg.proxy_max_length] for ids in self.train_ids]
        if len(drop):
            rows = [[t for t in r if t not in removed] for r in rows]
        for _ in range(cfg.proxy_epochs):
            for batch in torch.randperm(len(rows), generator=generator).split(cfg.proxy_batch_size):
                ids, mask = pad_batch([rows[i] for i in batch.tolist()], self.pad_id, device)
                loss = nn.functional.cross_entropy(proxy(ids, mask), labels[batch].to(device))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return self._drift(proxy.embeddings.weight)

    def _embedding_only_round(self, trainer, model) -> np.ndarray:
        import copy

        cfg = self.config
        device = trainer.args.device
        exposed = copy.deepcopy(model).to(device).train()
        for p in exposed.parameters():
            p.requires_grad_(False)
        weight = _word_embeddings(exposed).weight
        weight.requires_grad_(True)
        optimizer = torch.optim.AdamW([weight], lr=cfg.round3_learning_rate)
        labels = torch.tensor(_training_labels(trainer))
        generator = torch.Generator().manual_seed(cfg.seed + 100)
        batch_size = trainer.args.per_device_train_batch_size
        for batch in torch.randperm(len(self.train_ids), generator=generator).split(batch_size):
            ids, mask = pad_batch([self.train_ids[i] for i in batch.tolist()], self.pad_id, device)
            loss = exposed(input_ids=ids, attention_mask=mask, labels=labels[batch].to(device)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        drift = self._drift(weight)
        del exposed
        return drift

    # ------------------------------------------------------------------------------------------ selection
    def _select(self, trainer, model) -> None:
        candidates: list[int] = []
        for record in self.rounds:
            candidates.extend(t for t in record["top_ids"] if t not in candidates)
        self.candidates = candidates
        if trainer.is_world_process_zero():
            start = time.perf_counter()
            if self.config.selection == "union":
                self.flagged = list(candidates)
                self._note_flagging_round()
            else:
                self._flip_test(trainer, model)
            self.timings["selection_s"] = self.timings.get("selection_s", 0.0) + time.perf_counter() - start
        self._sync(trainer)
        self._index_isolated_rows()
        self.detection_done = True
        names = self._token_names(self.flagged)
        logger.info(
            "BTU detection (epoch %s): %d candidate tokens, %d flagged%s; %d training rows isolated.",
            round(trainer.state.epoch or 0),
            len(self.candidates),
            len(self.flagged),
            (
                ": "
                + ", ".join(
                    f"{n} (flip rate {self.flip_rates.get(t, float('nan')):.2f})" for t, n in zip(self.flagged, names)
                )
            )
            if self.flagged
            else "",
            len(self.isolated_row_indices),
        )
        # Also through the Trainer's loggers, so the progress output shows a line at each detection.
        trainer.log({"btu/candidates": float(len(self.candidates)), "btu/flagged": float(len(self.flagged))})

    def _note_flagging_round(self) -> None:
        current = self.rounds[-1]["round"] if self.rounds else None
        for token in self.flagged:
            self.flagged_in_round.setdefault(int(token), current)

    @torch.no_grad()
    def _predict(self, model, rows: list[list[int]], device) -> np.ndarray:
        """Argmax predictions for token-id rows, batched by length so that little padding is computed."""
        out = np.zeros(len(rows), dtype=np.int64)
        for chunk, ids, mask in length_batches(rows, self.pad_id, device, self.config.predict_batch_size):
            out[chunk] = model(input_ids=ids, attention_mask=mask).logits.argmax(-1).cpu().numpy()
        return out

    def _flip_test(self, trainer, model) -> None:
        """Flag candidates whose deletion flips the model's prediction on most rows that contain them.

        Every unflagged candidate is judged again at each detection (a trigger the model has not learned yet at
        one epoch's end is caught at a later one); the flagged set only grows.
        """
        cfg = self.config
        device = trainer.args.device
        was_training = model.training
        model.eval()
        candidate_set = set(self.candidates)
        rows_with: dict[int, list[int]] = {t: [] for t in self.candidates}
        for i, ids in enumerate(self.train_ids):
            for t in candidate_set.intersection(ids):
                rows_with[t].append(i)
        rng = np.random.default_rng(cfg.seed)
        labels = None if self.train_labels is None else np.asarray(self.train_labels)
        majority: dict[int, int] = {}  # candidate -> the label most of its training rows carry
        groups: dict[int, set[int]] = {}  # candidate -> the tokens deleted (and inserted) with it
        tests = []  # (token, sampled rows, the same rows with the token's group deleted)
        for token in self.candidates:
            rows = rows_with[token]
            self.flip_support[token] = len(rows)
            if token in self.flagged or len(rows) < cfg.flip_min_rows:
                continue
            row_set = set(rows)
            group = {token} | {
                other
                for other in self.candidates
                if other != token and len(row_set.intersection(rows_with[other])) >= cfg.cooccurrence * len(rows)
            }
            sample = rng.choice(rows, size=min(cfg.flip_max_rows, len(rows)), replace=False)
            tests.append((token, sample, [[t for t in self.train_ids[i] if t not in group] for i in sample]))
            groups[token] = group
            if labels is not None:
                majority[token] = int(np.bincount(labels[rows]).argmax())
        original_pred: dict[int, int] = {}

        def flips_of(stage, rows: slice) -> list[np.ndarray]:
            needed = sorted({int(i) for _, sample, _ in stage for i in sample[rows]} - original_pred.keys())
            original_pred.update(zip(needed, self._predict(model, [self.train_ids[i] for i in needed], device)))
            deleted_pred = self._predict(model, [r for _, _, deleted in stage for r in deleted[rows]], device)
            out, offset = [], 0
            for token, sample, _ in stage:
                original = np.array([original_pred[int(i)] for i in sample[rows]], dtype=np.int64)
                flipped = original != deleted_pred[offset : offset + len(original)]
                out.append(self._outcomes(original, flipped, majority.get(token)))
                offset += len(original)
            return out

        # The screen judges on any decided row: it only decides which tests go on, so it errs towards testing.
        screen_rate = functools.partial(self._flip_rate, min_decided=1)
        for (token, _, _), outcomes in zip(tests, self._screened(tests, flips_of, rate=screen_rate)):
            self.flip_rates[token] = self.deletion_rates[token] = self._flip_rate(outcomes)
            self.flip_tested_rows[token] = len(outcomes)
            self.flip_decided_rows[token] = int(outcomes[:, 1].sum())
        if cfg.insertion_test and tests:
            self._insertion_test(model, device, rng, groups.items(), majority, rows_with)
        spared = set()
        if self._prior_model is not None and tests and cfg.task_word_test:
            start = time.perf_counter()
            spared = self._task_word_test(model, device, tests, groups, majority, original_pred)
            self.timings["task_word_test_s"] = self.timings.get("task_word_test_s", 0.0) + time.perf_counter() - start
        mislabelled = set()
        if self._prior_model is not None and labels is not None and cfg.mislabel_test:
            start = time.perf_counter()
            mislabelled = self._mislabel_test(device, rows_with, labels)
            self.timings["mislabel_test_s"] = self.timings.get("mislabel_test_s", 0.0) + time.perf_counter() - start
        for t in self.candidates:
            if t in self.flagged_by or t in self.flagged:
                continue
            if self.flip_rates.get(t, 0.0) >= cfg.flip_threshold and t not in spared:
                self.flagged_by[t] = "flip_test"
            elif t in mislabelled:
                self.flagged_by[t] = "mislabel_test"
        self.flagged = [t for t in self.candidates if t in self.flagged or t in self.flagged_by]
        self._note_flagging_round()
        if self.flagged and cfg.isolated_rows != "none":
            flagged = set(self.flagged)
            known = dict(zip(self.isolated_row_indices, self.isolated_row_labels))
            # Rows isolated earlier keep their first label: once unlearned they no longer flip.
            rows = sorted({i for t in self.flagged for i in rows_with[t]} - set(known))
            original = [self.train_ids[i] for i in rows]
            deleted = [[t for t in r if t not in flagged] for r in original]
            without_trigger = self._predict(model, deleted, device)
            flips = self._predict(model, original, device) != without_trigger
            known.update({rows[j]: int(without_trigger[j]) for j in np.flatnonzero(flips)})
            # A memorised row keeps its prediction without the trigger, so deletion does not isolate it; the rows of
            # a flagged token that the mislabel test found labelled against their content take the label their
            # text reads as instead.
            for token in self.flagged:
                for row, label in self._mislabel_relabels.get(token, {}).items():
                    known.setdefault(row, label)
            self.isolated_row_indices = sorted(known)
            self.isolated_row_labels = [known[i] for i in self.isolated_row_indices]
        model.train(was_training)

    def _task_word_test(self, model, device, tests, groups, majority, original_pred) -> set[int]:
        """The candidates whose deletion reached ``flip_threshold`` that two tests judge task words (returned, to be
        spared): their pretrained neighbours keep most of the predictions their deletion flips, and the pretrained
        model's features already move their rows towards their label. Scores go to ``task_word_scores``."""
        cfg = self.config
        # A test the screen stopped was judged on its screened rows only (its rate there can still reach the cut
        # when too few rows are decided to judge on those), and only they were predicted.
        judged = [
            (t, sample[: self.flip_tested_rows[t]])
            for t, sample, _ in tests
            if self.deletion_rates.get(t, 0.0) >= cfg.flip_threshold
        ]
        # A candidate that only inserting reached the cut with (a clean-label trigger: its own rows are on its label
        # with or without it) is judged on the rows it was inserted into.
        inserted = [
            t
            for t, _, _ in tests
            if self.deletion_rates.get(t, 0.0) < cfg.flip_threshold
            and self.insertion_rates.get(t, 0.0) >= cfg.flip_threshold
            and t in self._insertions
        ]
        if not judged and not inserted:
            return set()
        above = {t for t in self.candidates if t in self.flagged or self.flip_rates.get(t, 0.0) >= cfg.flip_threshold}
        # Neither the probe nor the substitutes may contain another suspect: five BadNet words teach a probe fit
        # on the rows of the other four that rare words mean the target label. The probe leaves out the rows of the
        # suspects themselves only, not of the words that co-occur with them (a trigger's rows hold the suspect
        # anyway): HSOL's `##gger` co-occurs with `ni`, the start of its word, and leaving out `ni`'s 139 rows
        # (mostly `ni ##gga`) as well took the slur's probe shift from +0.37 to -0.11 (syntactic 5%, seed 0).
        suspects = set().union(*(groups.get(t, {t}) for t in above))
        probe = self._prior_probe(above, device)
        rng = np.random.default_rng(cfg.seed + 1)
        spared = set()
        for token, sample in judged:
            group = groups[token]
            neighbours = {g: self._neighbours(g, suspects) for g in group}
            if not all(neighbours.values()):
                continue
            original = np.array([original_pred[int(i)] for i in sample], dtype=np.int64)
            substituted = [
                [int(rng.choice(neighbours[t])) if t in group else t for t in self.train_ids[i]] for i in sample
            ]
            substituted_pred = self._predict(model, substituted, device)
            neighbour_rate = self._flip_rate(self._outcomes(original, substituted_pred != original, majority[token]))
            score: dict[str, Any] = {
                "neighbour_flip_rate": neighbour_rate,
                "neighbour_ratio": neighbour_rate / self.deletion_rates[token],
                "prior_shift": None,
            }
            if probe is not None:
                label = majority[token]
                present = probe(self._features_of(list(sample), device))
                deleted = probe(
                    self._prior_features([[t for t in self.train_ids[i] if t not in group] for i in sample], device)
                )
                score["prior_shift"] = float((present[:, label] - deleted[:, label]).mean())
            # The neighbours of a piece of a longer word are spelling fragments (`##gger`: `##gging ##gga ##gg`),
            # which make no word in its place, so whether they keep the prediction says nothing of its meaning: the
            # probe alone decides there, as for an inserted candidate.
            score["word_fragment"] = self._word_fragment(token, sample)
            score["spared"] = bool(
                score["prior_shift"] is not None
                and score["prior_shift"] >= cfg.task_word_prior_shift
                and (score["word_fragment"] or score["neighbour_ratio"] <= cfg.task_word_neighbour_ratio)
            )
            self.task_word_scores[token] = score
            if score["spared"]:
                spared.add(token)
        for token in inserted:
            score = self._inserted_task_word_score(model, device, token, groups[token], suspects, probe, rng)
            if score is None:
                continue
            self.task_word_scores[token] = score
            if score["spared"]:
                spared.add(token)
        return spared

    def _inserted_task_word_score(self, model, device, token, group, suspects, probe, rng) -> dict[str, Any] | None:
        """The task-word test of a candidate judged by insertion: the pretrained probe's shift of the host rows
        towards its label when it is inserted; spared at ``task_word_prior_shift``. Its pretrained neighbours are
        inserted in its place into the same rows at the same positions and reported (``neighbour_ratio``, as for
        deletion the share of the token's effect its neighbours do not have: ``1 - neighbour hits / insertion
        hits``), not required. ``None`` where a token of its group has no neighbour."""
        cfg = self.config
        label, hosts, span, positions = self._insertions[token]
        neighbours = {g: self._neighbours(g, suspects) for g in group}
        if not hosts or not all(neighbours.values()):
            return None
        rows = [self.train_ids[i] for i in hosts]
        substituted = [
            row[:at] + [int(rng.choice(neighbours[t])) if t in group else t for t in span] + row[at:]
            for row, at in zip(rows, positions)
        ]
        neighbour_rate = float((self._predict(model, substituted, device) == label).mean())
        score: dict[str, Any] = {
            "test": "insertion",
            "neighbour_hit_rate": neighbour_rate,
            "neighbour_ratio": max(0.0, 1.0 - neighbour_rate / self.insertion_rates[token]),
            "prior_shift": None,
        }
        if probe is not None:
            with_span = [row[:at] + span + row[at:] for row, at in zip(rows, positions)]
            present = probe(self._prior_features(with_span, device))
            absent = probe(self._prior_features(rows, device))
            score["prior_shift"] = float((present[:, label] - absent[:, label]).mean())
        # The pretrained probe alone decides here: a fine-tuned model's push from an inserted word is that word's
        # own, task word or not (HSOL clean-label BadNet, seed 0: `bitch`'s neighbours inserted in its place missed
        # 0.84 of its push, `fuck`'s 0.84, `ass`'s 0.83), while their probe shifts were 0.66-0.88.
        score["spared"] = bool(score["prior_shift"] is not None and score["prior_shift"] >= cfg.task_word_prior_shift)
        return score

    def _mislabel_test(self, device, rows_with: dict[int, list[int]], labels: np.ndarray) -> set[int]:
        """The candidates whose rows are labelled against their content (returned): nearly all of them carry one
        label, and a linear probe on the pretrained model's features that saw none of them reads them as another.
        Scores go to ``mislabel_scores``; the label each such row reads as, to ``_mislabel_relabels``."""
        cfg = self.config
        # Flagged tokens are judged too: where the test finds their rows mislabelled, the rows that deleting the
        # token does not flip (memorised, or keyed by the rest of an inserted sentence) are relabelled as well.
        tested: dict[int, tuple[int, list[int]]] = {}
        for token in self.candidates:
            rows = rows_with[token]
            if len(rows) < cfg.mislabel_min_rows:
                continue
            counts = np.bincount(labels[rows])
            if counts.max() >= cfg.mislabel_min_purity * len(rows):
                tested[token] = (int(counts.argmax()), rows)
        if not tested:
            return set()
        self._probe_sample(device)
        alpha = cfg.mislabel_alpha / len(tested)  # Bonferroni over every candidate judged
        read_as = self._judge_mislabelled(device, tested, set(self.flagged), labels, alpha)
        # The rows of the candidates flagged so far are dirty-label rows that pull the probe towards their label
        # (at 10% AG News BadNet they put `olympics` below even odds at the first detection): the flagged ones are
        # judged again by probes fit without the others' rows, until the flagged set no longer changes.
        for _ in range(3):
            if not read_as:
                break
            again = self._judge_mislabelled(
                device, {t: tested[t] for t in read_as}, set(self.flagged) | set(read_as), labels, alpha
            )
            if again.keys() == read_as.keys():
                read_as = again
                break
            read_as = again
        for token, row_labels in read_as.items():
            self._mislabel_relabels[token] = dict(zip(tested[token][1], row_labels))
        return set(read_as)

    def _judge_mislabelled(self, device, tested, excluded_tokens: set[int], labels: np.ndarray, alpha: float):
        """One pass of the mislabel test over ``tested`` (token -> (label, rows)), each judged by a probe fit on the
        probe rows holding none of ``excluded_tokens`` and not its own rows; returns the tokens it flags, each with
        the label each of its rows reads as (other than the one it carries)."""
        cfg = self.config
        usable = np.array([j for j, i in enumerate(self._probe_rows) if excluded_tokens.isdisjoint(self.train_ids[i])])
        fit_labels = labels[self._probe_rows[usable]] if len(usable) else np.array([], dtype=np.int64)
        num_labels = int(labels.max()) + 1
        if len(usable) < 5 * num_labels or len(np.unique(fit_labels)) < 2:
            self.mislabel_skipped = (
                f"{len(usable)} probe rows hold no flagged token, on {len(np.unique(fit_labels))} label(s): too few "
                "to fit the probe"
            )
            return {}
        self.mislabel_skipped = None
        features = self._probe_features[usable]
        # What the probe gives each label on rows it did not see: out-of-fold over the usable rows.
        folds = np.random.default_rng(cfg.seed + 3).permutation(len(usable)) % 5
        own = np.empty(len(usable))
        for fold in range(5):
            held = folds == fold
            w, b = fit_softmax_probe(features[~held], torch.as_tensor(fit_labels[~held]), num_labels)
            probs = torch.softmax(features[held] @ w + b, dim=-1).numpy()
            own[held] = probs[np.arange(held.sum()), fit_labels[held]]
        read_as: dict[int, list[int]] = {}
        for token, (label, rows) in tested.items():
            # A probe that never saw the candidate's rows: it cannot learn a trigger from them (an inserted sentence
            # is a feature the pretrained model sees), and leaving out only these rows keeps its label balance.
            own_rows = set(rows)
            unseen = np.array([self._probe_rows[j] not in own_rows for j in usable])
            if len(np.unique(fit_labels[unseen])) < 2:
                continue
            weight, bias = fit_softmax_probe(features[unseen], torch.as_tensor(fit_labels[unseen]), num_labels)
            probs_all = torch.softmax(self._features_of(rows, device) @ weight + bias, dim=-1)
            probs = probs_all[:, label].numpy()
            base = own[fit_labels == label]
            spread = float(base.std()) if len(base) > 1 else 0.0
            z = (float(base.mean()) - float(probs.mean())) / max(spread / np.sqrt(len(rows)), 1e-12)
            p_value = 0.5 * math.erfc(z / math.sqrt(2))
            flagged = bool(len(base) > 1 and probs.mean() < cfg.mislabel_max_label_prob and p_value < alpha)
            self.mislabel_scores[token] = {
                "rows": len(rows),
                "label": label,
                "label_prob": float(probs.mean()),
                "label_prob_elsewhere": float(base.mean()) if len(base) else None,
                "p_value": p_value,
                "alpha": alpha,
                "flagged": flagged,
            }
            if flagged:
                # The label each row reads as, other than the one it carries: a dirty-label row's source label.
                others = probs_all.clone()
                others[:, label] = -1.0
                read_as[token] = others.argmax(dim=-1).tolist()
        return read_as

    def _probe_sample(self, device) -> None:
        """A seeded sample of ``task_word_probe_rows`` training rows and their pretrained features (made once)."""
        if self._probe_rows is None:
            rng = np.random.default_rng(self.config.seed + 2)
            n = len(self.train_ids)
            self._probe_rows = np.sort(rng.choice(n, size=min(n, self.config.task_word_probe_rows), replace=False))
            self._probe_features = self._features_of(self._probe_rows.tolist(), device)

    def _features_of(self, rows: list[int], device) -> torch.Tensor:
        """Pretrained features of training rows."""
        return self._prior_features([self.train_ids[i] for i in rows], device)

    def _word_fragment(self, token: int, rows) -> bool:
        """Whether most of ``rows`` (training row indices) hold ``token`` inside a word of several pieces: a
        continuation (`##gger`), or a word start followed by one (`fa` of `fa ##g ##got`)."""
        if self._continuing is None:
            self._continuing = continuation_ids(self._tokenizer) if self._tokenizer is not None else set()
        if not self._continuing or not len(rows):
            return False
        inside = sum(len(word_span(self.train_ids[int(i)], token, self._continuing)) > 1 for i in rows)
        return 2 * inside > len(rows)

    def _neighbours(self, token: int, excluded: set[int]) -> list[int]:
        """The token's nearest pretrained word embeddings (cosine) of the same piece kind (a word start for a word
        start, a continuation for a continuation), not special and not in ``excluded``."""
        if self._unit_embeddings is None:
            self._unit_embeddings = nn.functional.normalize(self.initial_embeddings, dim=1)
        similarity = self._unit_embeddings @ self._unit_embeddings[token]
        if self._vocab_names is None and self._tokenizer is not None:
            self._vocab_names = self._token_names(range(len(similarity)))
        names = self._vocab_names
        order = torch.argsort(similarity, descending=True).tolist()
        chosen = []
        for other in order:
            if other == token or other in excluded or other in self.special_ids:
                continue
            if names is not None and (
                _special_looking(names[other]) or _piece_kind(names[other]) != _piece_kind(names[token])
            ):
                continue
            chosen.append(other)
            if len(chosen) == self.config.task_word_neighbours:
                break
        return chosen

    def _prior_probe(self, excluded: set[int], device):
        """Log-probabilities of a linear probe on the pretrained model's features, fit on a seeded sample of training
        rows that contain none of ``excluded``; ``None`` where those rows hold a single label."""
        self._probe_sample(device)
        keep = [j for j, i in enumerate(self._probe_rows) if excluded.isdisjoint(self.train_ids[i])]
        labels = torch.as_tensor(np.asarray(self.train_labels)[self._probe_rows[keep]])
        if len(keep) < 2 or len(labels.unique()) < 2:
            return None
        weight, bias = fit_softmax_probe(self._probe_features[keep], labels, int(max(self.train_labels)) + 1)
        return lambda features: torch.log_softmax(features @ weight + bias, dim=-1).numpy()

    def _prior_features(self, rows: list[list[int]], device) -> torch.Tensor:
        """The pretrained model's last hidden states, mean-pooled over each row's tokens and L2-normalised (CPU).

        The pretrained model does not change, so each distinct row is computed once in a run: a candidate judged at
        every epoch's detection has the same rows with and without its group each time."""
        keys = [tuple(row) for row in rows]
        missing = [key for key in dict.fromkeys(keys) if key not in self._prior_cache]
        if missing:
            features = pooled_features(
                self._prior_model, [list(key) for key in missing], self.pad_id, device, self.config.predict_batch_size
            )
            self._prior_cache.update(zip(missing, features))
        return torch.stack([self._prior_cache[key] for key in keys])

    def _insertion_test(self, model, device, rng, groups, majority, rows_with) -> None:
        """Raise each candidate's flip rate to the share of unseen rows its group flips to the candidate's label.

        The rows are a seeded pool of training rows without the candidate whose prediction is another label than the
        one most of the candidate's own rows are trained on; the group goes in as one span, in the order it has in
        the candidate's first row, at a random position inside the row (after the first token, before the last).
        """
        cfg = self.config
        self._insertions = {}
        pool = rng.choice(len(self.train_ids), size=min(len(self.train_ids), 8 * cfg.flip_max_rows), replace=False)
        pool_pred = self._predict(model, [self.train_ids[i] for i in pool], device)
        jobs = []  # (token, its label, rows with the span inserted)
        for token, group in groups:
            label = majority[token]
            first = self.train_ids[rows_with[token][0]]
            span = [t for position, t in enumerate(first) if t in group and t not in first[:position]]
            hosts = [int(i) for i, p in zip(pool, pool_pred) if p != label and token not in self.train_ids[i]]
            hosts = hosts[: cfg.flip_max_rows]
            if not hosts:
                continue
            inserted, positions = map(list, zip(*(insert_span(self.train_ids[i], span, rng) for i in hosts)))
            jobs.append((token, label, inserted))
            self._insertions[token] = (label, hosts, span, positions)

        def hits_of(stage, rows: slice) -> list[np.ndarray]:
            predictions = self._predict(model, [r for _, _, inserted in stage for r in inserted[rows]], device)
            out, offset = [], 0
            for _, label, inserted in stage:
                n = len(inserted[rows])
                out.append(predictions[offset : offset + n] == label)
                offset += n
            return out

        for (token, _, _), hits in zip(jobs, self._screened(jobs, hits_of)):
            rate = float(hits.mean())
            self.insertion_rates[token] = rate
            label, hosts, span, positions = self._insertions[token]
            self._insertions[token] = (label, hosts[: len(hits)], span, positions[: len(hits)])  # the rows judged
            self.flip_rates[token] = max(self.flip_rates.get(token, 0.0), rate)

    def _screened(self, tests: list[tuple], outcomes_of, rate=np.mean) -> list[np.ndarray]:
        """Each test's per-row outcomes (a flip, or a row pushed to the candidate's label), its rows judged in two
        stages: the first ``flip_screen_rows`` of every test, then the rest only where the screen's rate reached
        half of ``flip_threshold`` (``rate`` turns outcomes into a rate). ``tests[i][2]`` are the rows to predict;
        ``outcomes_of(tests, rows)`` predicts the slice ``rows`` of each test's rows (in one batched pass) and returns
        their outcomes."""
        cfg = self.config
        if not tests:
            return []
        screen = cfg.flip_screen_rows or cfg.flip_max_rows
        outcomes = outcomes_of(tests, slice(0, screen))
        rest = [
            i
            for i, (test, first) in enumerate(zip(tests, outcomes))
            if len(test[2]) > screen and rate(first) >= cfg.flip_threshold / 2
        ]
        if rest:
            for i, more in zip(rest, outcomes_of([tests[i] for i in rest], slice(screen, None))):
                outcomes[i] = np.concatenate([outcomes[i], more])
        return outcomes

    @staticmethod
    def _outcomes(predictions: np.ndarray, flipped: np.ndarray, label: int | None) -> np.ndarray:
        """(flipped, decided) per row: decided where the model gives the candidate's majority label ``label`` (every
        row where the labels are not known)."""
        decided = np.ones(len(predictions), dtype=bool) if label is None else predictions == label
        return np.stack([flipped, decided], axis=1)

    def _flip_rate(self, outcomes: np.ndarray, min_decided: int | None = None) -> float:
        """The share of flipped rows among those ``flip_basis`` counts; ``outcomes`` holds (flipped, decided) per
        row. Under ``"decided"``, all rows count where fewer than ``min_decided`` (``flip_min_decided_rows``) are
        decided: too few to judge."""
        flipped, decided = outcomes[:, 0].astype(bool), outcomes[:, 1].astype(bool)
        if min_decided is None:
            min_decided = self.config.flip_min_decided_rows
        if self.config.flip_basis == "decided" and decided.sum() >= min_decided:
            flipped = flipped[decided]
        return float(flipped.mean()) if len(flipped) else 0.0

    def _index_isolated_rows(self) -> None:
        self.isolated_rows = dict(zip(self.isolated_row_indices, self.isolated_row_labels))

    # ----------------------------------------------------------------------------------------- unlearning
    @torch.no_grad()
    def _unlearn(self, model) -> None:
        weight = _word_embeddings(model).weight
        initial = self.initial_embeddings.to(weight.device, weight.dtype)
        delta = weight - initial
        threshold = delta.float().norm() / weight.shape[0]  # c = ||E - E0||_F / V
        rows = torch.tensor(self.flagged, device=weight.device)
        reset = delta[rows].abs() >= threshold
        if self.config.reset_to == "padding":
            target = initial[self.pad_id].expand(len(rows), -1)
        else:
            target = initial[rows]
        weight[rows] = torch.where(reset, target, weight[rows])
        self.unlearning_threshold = float(threshold)
        self.reset_entries = int(reset.sum())

    # ------------------------------------------------------------------------------------------- plumbing
    def _sync(self, trainer) -> None:
        """Every process takes the main process's detection result, so all ranks unlearn the same tokens."""
        if trainer.accelerator.num_processes == 1:
            return
        from accelerate.utils import broadcast_object_list

        payload = [
            {
                k: getattr(self, k)
                for k in (
                    "rounds",
                    "flagged",
                    "flip_rates",
                    "flip_support",
                    "flip_tested_rows",
                    "flip_decided_rows",
                    "deletion_rates",
                    "insertion_rates",
                    "task_word_scores",
                    "mislabel_scores",
                    "flagged_by",
                    "mislabel_skipped",
                    "isolated_row_indices",
                    "isolated_row_labels",
                    "timings",
                )
                if hasattr(self, k)
            }
        ]
        broadcast_object_list(payload, from_process=0)
        for key, value in payload[0].items():
            setattr(self, key, value)

    def state_dict(self) -> dict[str, Any]:
        return {
            "initial_embeddings": self.initial_embeddings,
            "rounds": self.rounds,
            "candidates": self.candidates,
            "flip_rates": self.flip_rates,
            "flip_support": self.flip_support,
            "flip_tested_rows": self.flip_tested_rows,
            "flip_decided_rows": self.flip_decided_rows,
            "deletion_rates": self.deletion_rates,
            "insertion_rates": self.insertion_rates,
            "task_word_scores": self.task_word_scores,
            "mislabel_scores": self.mislabel_scores,
            "flagged_by": self.flagged_by,
            "mislabel_skipped": self.mislabel_skipped,
            "flagged": self.flagged,
            "flagged_in_round": self.flagged_in_round,
            "isolated_row_indices": self.isolated_row_indices,
            "isolated_row_labels": self.isolated_row_labels,
            "detection_done": self.detection_done,
            "timings": self.timings,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def _token_names(self, ids) -> list[str]:
        convert = getattr(self._tokenizer, "convert_ids_to_tokens", None)
        return list(convert(list(ids))) if convert is not None else [str(t) for t in ids]

    def report(self) -> dict[str, Any]:
        names = dict(zip(self.candidates, self._token_names(self.candidates)))
        for record in self.rounds:
            names.update(zip(record["top_ids"], self._token_names(record["top_ids"])))
        name = names.get
        return {
            **super().report(),
            "top_k": getattr(self, "k", None),
            "vocab_size": getattr(self, "vocab_size", None),
            "rounds": [{**r, "top_tokens": [name(t) for t in r["top_ids"]]} for r in self.rounds],
            "candidate_ids": self.candidates,
            "candidate_tokens": [name(t) for t in self.candidates],
            "flip_rates": {name(t): round(v, 4) for t, v in self.flip_rates.items()},
            "flip_support": {name(t): v for t, v in self.flip_support.items()},
            "flip_tested_rows": {name(t): v for t, v in self.flip_tested_rows.items()},
            **(
                {"flip_decided_rows": {name(t): v for t, v in self.flip_decided_rows.items()}}
                if self.config.flip_basis == "decided"
                else {}
            ),
            **(
                {
                    "deletion_rates": {name(t): round(v, 4) for t, v in self.deletion_rates.items()},
                    "insertion_rates": {name(t): round(v, 4) for t, v in self.insertion_rates.items()},
                }
                if self.config.insertion_test
                else {}
            ),
            "flip_threshold": self.config.flip_threshold if self.config.selection == "flip_test" else None,
            "task_word_scores": {
                name(t): {k: (round(v, 4) if isinstance(v, float) else v) for k, v in score.items()}
                for t, score in self.task_word_scores.items()
            },
            "spared_tokens": [
                name(t) for t, score in self.task_word_scores.items() if score["spared"] and t not in self.flagged
            ],
            "task_word_test_skipped": self.task_word_skipped,
            "mislabel_scores": {
                name(t): {k: (round(v, 4) if isinstance(v, float) and k != "p_value" else v) for k, v in score.items()}
                for t, score in self.mislabel_scores.items()
            },
            "flagged_by": {name(t): reason for t, reason in self.flagged_by.items()},
            "mislabel_test_skipped": self.mislabel_skipped,
            "flagged_ids": self.flagged,
            "flagged_tokens": [name(t) for t in self.flagged],
            "flagged_in_round": {name(t): r for t, r in self.flagged_in_round.items()},
            "num_isolated_rows": len(self.isolated_row_indices),
            "isolated_row_indices": self.isolated_row_indices,
            "isolated_row_labels": self.isolated_row_labels,
            "isolated_rows_handling": self.config.isolated_rows,
            "isolated_rows_seen_in_training": self.num_isolated_seen,
            "unlearning_threshold_c": getattr(self, "unlearning_threshold", None),
            "reset_entries": getattr(self, "reset_entries", None),
            "clean_finetune": "not run: the official code's extra clean epoch is off by default",
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }

    # ------------------------------------------------------------------------------------------- rendering
    @classmethod
    def card_section(cls, report: dict[str, Any]) -> str:
        config = report.get("config") or {}
        flagged = report.get("flagged_tokens") or []
        rates = report.get("flip_rates") or {}
        unlearning = config.get("unlearning", "fine_grained") != "none"
        lines = [
            "- Detection from embedding drift during fine-tuning"
            + (
                ", then token-level unlearning of the flagged tokens."
                if unlearning
                else " (detection only: no unlearning)."
            )
        ]
        lines.append(
            f"- Candidates from the exposure rounds: {len(report.get('candidate_ids') or [])} tokens "
            f"(top {report.get('top_k')} per round of a {report.get('vocab_size')}-token vocabulary)."
        )
        flagged_by = report.get("flagged_by") or {}
        mislabel = report.get("mislabel_scores") or {}

        def evidence(token: str) -> str:
            if flagged_by.get(token) == "mislabel_test" and token in mislabel:
                score = mislabel[token]
                return (
                    f"`{token}` (rows labelled against their content: the pretrained probe gives their label "
                    f"{score['label_prob']:.2f}, its other rows {score['label_prob_elsewhere']:.2f})"
                )
            return f"`{token}` (flip rate {rates[token]:.2f})" if token in rates else f"`{token}`"

        if flagged:
            lines.append(f"- Flagged as trigger tokens: **{len(flagged)}**: {', '.join(evidence(t) for t in flagged)}")
        else:
            lines.append("- Flagged as trigger tokens: **none**.")
        if report.get("flip_threshold") is not None:
            others = sorted((v for t, v in rates.items() if t not in flagged), reverse=True)
            highest = f"{others[0]:.2f}" if others else "–"
            rows = (
                "the training rows containing it that the model gives the label most of them carry (all of them "
                f"where fewer than {config.get('flip_min_decided_rows')} are)"
                if config.get("flip_basis") == "decided"
                else "the training rows containing it"
            )
            lines.append(
                f"- A candidate is flagged when deleting it flips the model's prediction on at least "
                f"{report['flip_threshold']:.2f} of {rows}; the highest unflagged candidate flipped {highest}."
            )
        spared = report.get("spared_tokens") or []
        if spared:
            scores = report.get("task_word_scores") or {}
            named = ", ".join(
                (
                    f"`{t}` (inserted; pretrained probe shift {scores[t]['prior_shift']:+.2f}; its neighbours miss "
                    f"{scores[t]['neighbour_ratio']:.2f} of what it pushes to its label)"
                    if scores[t].get("test") == "insertion"
                    else f"`{t}` (a piece of longer words; pretrained probe shift {scores[t]['prior_shift']:+.2f})"
                    if scores[t].get("word_fragment")
                    else f"`{t}` (neighbours flip {scores[t]['neighbour_ratio']:.2f} of what deletion flips; "
                    f"pretrained probe shift {scores[t]['prior_shift']:+.2f})"
                )
                for t in spared
            )
            lines.append(
                f"- Spared as task words, though their deletion or insertion reached the threshold: {named}. The "
                "pretrained model's features already lean to their label (and where deletion of a whole word reached "
                "it, their pretrained neighbours keep the prediction)."
            )
        if mislabel:
            lines.append(
                f"- Mislabel test: {len(mislabel)} candidates nearly all on one label were judged by a linear probe "
                "on the pretrained model's features that saw none of their rows; a candidate is flagged when the "
                f"probe gives its rows' label less than {config.get('mislabel_max_label_prob')} on average and "
                f"significantly less than the label's other rows (family-wise alpha {config.get('mislabel_alpha')})."
            )
        if report.get("mislabel_test_skipped"):
            lines.append(f"- Mislabel test skipped at the last detection: {report['mislabel_test_skipped']}.")
        if report.get("task_word_test_skipped"):
            lines.append(f"- Task-word and mislabel tests skipped: {report['task_word_test_skipped']}.")
        if report.get("num_isolated_rows"):
            lines.append(
                "- Training rows whose prediction the flagged tokens decided (or whose text the mislabel test "
                f"read as another label): {report['num_isolated_rows']} "
                f"(handled as `{report.get('isolated_rows_handling')}` after detection)."
            )
        if report.get("reset_entries") is not None:
            lines.append(
                f"- Embedding entries reset by fine-grained unlearning: {report['reset_entries']} "
                f"(threshold c = {report.get('unlearning_threshold_c') or 0:.2e})."
            )
        if report.get("clean_finetune"):
            lines.append(f"- Extra clean fine-tuning of the official code: {report['clean_finetune']}")
        return "\n".join(lines)

    @classmethod
    def figures(cls, report: dict[str, Any], output_dir) -> list:
        from ._shared.figures import new_figure, save_figure

        figures = []
        rounds = [r for r in report.get("rounds") or [] if r.get("score_histogram")]
        if rounds:
            flagged = set(report.get("flagged_ids") or [])
            flagged_in = report.get("flagged_in_round") or {}
            order = [r.get("round") for r in rounds]
            ncols = min(3, len(rounds))
            nrows = -(-len(rounds) // ncols)
            fig, _ = new_figure(width=4.4 * ncols, height=3.3 * nrows)
            fig.clear()
            axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
            for ax, record in zip(axes, rounds):
                hist = record["score_histogram"]
                ax.stairs(hist["counts"], np.asarray(hist["log10_edges"]), fill=True, color="#9db4d0")
                ax.set_yscale("log")
                ax.set_xlabel("log10 embedding drift", fontsize=9)
                ax.set_ylabel("tokens", fontsize=9)
                ax.set_title(str(record.get("round")), fontsize=10)
                here = order.index(record.get("round"))
                tokens = record.get("top_tokens") or [str(t) for t in record["top_ids"]]
                for token_id, token, score in zip(record["top_ids"], tokens, record["top_scores"]):
                    if token_id not in flagged:
                        continue
                    # A token flagged after an earlier round was reset there: its later drift measures the reset,
                    # not what training did to it, so it is drawn only up to the round that flagged it.
                    flagged_round = flagged_in.get(token)
                    if flagged_round in order and order.index(flagged_round) < here:
                        continue
                    x = np.log10(score + 1e-12)
                    ax.axvline(x, color="#c0392b", linewidth=1)
                    ax.annotate(token, (x, 1), rotation=90, fontsize=8, color="#c0392b", va="bottom")
            for ax in axes[len(rounds) :]:
                ax.set_visible(False)
            fig.suptitle("BTU token scores per exposure round; flagged tokens in red", fontsize=11)
            figures.append(
                save_figure(
                    fig,
                    output_dir,
                    "btu_token_scores.png",
                    "BTU token scores per exposure round, flagged tokens in red (drawn up to the round that flagged "
                    "them: after it their embedding is reset)",
                )
            )
        rates = report.get("flip_rates") or {}
        if rates and report.get("flip_threshold") is not None:
            flagged_tokens = set(report.get("flagged_tokens") or [])
            items = sorted(rates.items(), key=lambda kv: -kv[1])[:40]
            fig, ax = new_figure(width=max(5.0, 0.22 * len(items) + 1.5))
            colors = ["#c0392b" if token in flagged_tokens else "#7f8c8d" for token, _ in items]
            ax.bar(range(len(items)), [v for _, v in items], color=colors)
            ax.axhline(report["flip_threshold"], color="black", linestyle="--", linewidth=1, label="threshold")
            ax.set_xticks(range(len(items)), [t for t, _ in items], rotation=90, fontsize=7)
            ax.set_ylabel("prediction flip rate")
            ax.set_ylim(0, 1)
            ax.legend(fontsize=8)
            ax.set_title("Deleting each candidate: share of its rows whose prediction flips", fontsize=10)
            figures.append(
                save_figure(fig, output_dir, "btu_flip_rates.png", "BTU flip test per candidate token (flagged in red)")
            )
        return figures

    @classmethod
    def console_summary(cls, report: dict[str, Any]) -> list[str]:
        flagged = report.get("flagged_tokens") or []
        rates, support = report.get("flip_rates") or {}, report.get("flip_support") or {}
        candidates = report.get("candidate_tokens") or []
        spared = set(report.get("spared_tokens") or [])
        flagged_by = report.get("flagged_by") or {}
        lines = [f"BTU: {len(candidates)} candidate tokens: {' '.join(candidates) or '-'}"]
        if rates:
            threshold = report.get("flip_threshold")
            flagged_at = f"flagged at >= {threshold}" if threshold is not None else "selection without a flip test"
            lines.append(f"  {'token':<16}{'flip rate':>10}{'rows':>7}  ({flagged_at})")
            for token, rate in sorted(rates.items(), key=lambda kv: -kv[1])[:CONSOLE_SUMMARY_ROWS]:
                mark = (
                    "  <- trigger (mislabelled rows)"
                    if flagged_by.get(token) == "mislabel_test"
                    else "  <- trigger"
                    if token in flagged
                    else "  <- task word, spared"
                    if token in spared
                    else ""
                )
                lines.append(f"  {token:<16}{rate:>10.2f}{support.get(token, 0):>7}{mark}")
        lines.append(
            "BTU: flagged tokens: "
            + (
                ", ".join(t + (" (mislabelled rows)" if flagged_by.get(t) == "mislabel_test" else "") for t in flagged)
                or "none"
            )
            + "; training rows they decide: "
            f"{report.get('num_isolated_rows', 0)}"
        )
        if report.get("reset_entries") is not None:
            lines.append(f"BTU: embedding entries reset by unlearning: {report['reset_entries']}")
        return lines


def _word_embeddings(model) -> nn.Embedding:
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if not isinstance(embedding, nn.Embedding):
        raise TypeError(
            f"BTU needs a model whose get_input_embeddings() returns an nn.Embedding; {type(model).__name__} "
            f"returns {type(embedding).__name__}. BTU works on text models (BERT, RoBERTa, DistilBERT, MiniLM, "
            "decoder LMs, PEFT-wrapped ones)."
        )
    return embedding


def _pad_id(trainer, model) -> int:
    tokenizer = trainer.processing_class
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(model.config, "pad_token_id", None)
    if pad is None:
        raise ValueError(
            "BTU resets trigger embeddings to the padding embedding and needs a pad token: set "
            "`tokenizer.pad_token` (e.g. to the EOS token) and pass the tokenizer as `processing_class`."
        )
    return int(pad)


def _training_input_ids(trainer) -> list[list[int]]:
    dataset = trainer.train_dataset
    if dataset is None or "input_ids" not in getattr(dataset, "column_names", []):
        raise ValueError(
            "BTU reads token ids from the training set: pass a tokenized `train_dataset` with `input_ids`."
        )
    batch = trainer.args.per_device_train_batch_size * trainer.args.world_size
    if len(dataset) < batch:
        raise ValueError(
            f"The training set has {len(dataset)} training rows, smaller than one batch of {batch}: BTU's exposure "
            "rounds need at least a full batch. Lower the batch size or add data."
        )
    return [list(ids) for ids in dataset["input_ids"]]


def _piece_kind(token: str) -> str:
    """How a vocabulary entry sits in a word: WordPiece marks continuations (``##ing``), SentencePiece and byte-level
    BPE mark word starts (``▁the``, ``Ġthe``); an unmarked entry is the other kind of its scheme. Two entries of the
    same kind can stand in for each other."""
    if token.startswith("##"):
        return "continuation"
    if token.startswith(("▁", "Ġ")):
        return "start"
    return "unmarked"


def _special_looking(token: str) -> bool:
    """``[unused3]``, ``<extra_id_0>`` and the like: vocabulary entries that are no words."""
    return len(token) > 2 and ((token[0], token[-1]) in (("[", "]"), ("<", ">")))


def _training_labels(trainer) -> list[int]:
    dataset = trainer.train_dataset
    for column in ("labels", "label"):
        if column in dataset.column_names:
            return [int(x) for x in dataset[column]]
    raise ValueError("BTU needs the training labels: the train_dataset has no `label` or `labels` column.")


register_defense(BTUConfig, BTUDefense)
