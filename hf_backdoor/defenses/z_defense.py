"""Z-defense: rows whose label a single surface feature predicts too well are pushed away from that label.

He et al., "Mitigating Backdoor Poisoning Attacks through the Lens of Spurious Correlation", EMNLP 2023 (official
code xlhex/emnlp2023_z-defence). A dirty-label backdoor makes a feature of the text (a rare word, an inserted
sentence, a syntactic template) predict the target label far better than any feature of the task does. The paper
scores every (feature, label) pair with a one-proportion z-test, ``z = (p(label | feature) - p(label)) / sqrt(p(label)
(1 - p(label)) / count(feature))``, and removes the training rows that hold an outlying pair before training; its
features are unigrams (lexical triggers) and the top levels of a constituency parse (syntactic triggers).

What this module does, and where it departs from the paper:

- **Features.** ``features="first_token"`` tests the row's first word piece: where HiddenKiller's template
  ``S(SBAR)(,)(NP)(VP)(.)`` shows without a parser (none can be installed offline here); on the packaged releases
  72-85% of the poisoned rows start with ``if``, ``when`` or ``as``. ``"tokens"`` adds every word piece of the row
  (the paper's unigrams: a rare word, an inserted sentence's words, a style's wording such as StyleBkd's Bible
  transfers' ``;``, ``##eth``, ``##os``). ``"auto"`` (the default) tests both and keeps the word-piece flags only
  while they look like a backdoor rather than the task's own words: they hold at most ``max_lexical_share`` (0.3) of
  the rows (HSOL's offensive and AG News's topic words flag 41-71% of the 2,000-row slices), one label holds at least
  ``min_target_share`` (0.8) of them (a backdoor has one target), each flag's rows stand apart from the rest of their
  label in their other word pieces (``min_wording_auroc``: a flag that does not is set aside as a task word and the
  test is run again without it; the rest of a flagged piece's word is masked too, or `cl` alone would set the
  rows of the clean `##iche` (cliche) apart; `bad` -> negative and `love` -> positive came out pure beside AddSent's
  `3d` and `watch` on an SST-2 slice, wording AUROC 0.51 and 0.62, and on the full 6,920-row SST-2 split 11 polar
  words and `@` came out pure beside 13 of a 20% style backdoor's marks) and together they do too; otherwise only
  the first word piece is tested.
- **Expansion** (``expand="auto"``, the default: it runs on the word-piece test's flags). A style is spread over the
  text and the z-test finds only its most frequent marks: ``;``, ``##os``, ``##eth`` hold 24-41% of the poisoned
  rows on the SST-2 slices. A dirty-label backdoor's rows are drawn from the other labels, so once the flagged pieces
  are masked, what tells the flagged rows from the other labels' rows is the rest of the trigger's wording. A
  bag-of-word-pieces logistic regression learns it, cross-fitted; the target label's unflagged rows it scores above
  ``expand_quantile`` (0.99) of the other labels' rows are flagged too, when the flagged rows stand apart from the
  rest of their label (AUROC >= ``min_wording_auroc``, 0.75: 0.82-0.89 on the SST-2 style and syntactic slices). With
  BTU it stopped the Bible-style backdoor on SST-2 at 20% and 25% on seeds 0 and 1 (README, "Style"). It does not
  run on first-token flags unless ``expand="always"``: where the word-piece test gave way, the wording that sets a
  flag's rows apart can be the task's own (on AG News the clean ``baghdad`` -> World flag's rows stand apart from
  other World rows, AUROC 0.911, and the expansion would add 104 clean Iraq stories).
- **Which pairs are flagged.** The paper takes pairs beyond a multiple of the z-scores' standard deviation, which on
  a 2,000-row slice separates nothing (z grows with the square root of the feature's count). Here a pair is flagged
  when it is significant (``z >= min_z``), nearly pure (``p(label | feature) >= min_purity``: a backdoor's rows all
  carry the target label) and frequent enough to matter (``count >= min_count``).
- **Rounds.** The poisoned rows themselves lift the target label's prior (20% poisoning of a 2,000-row SST-2 slice
  takes it from 0.51-0.53 to 0.71-0.73), and against that prior a trigger's smaller groups are not significant:
  HiddenKiller's rows that open with ``as`` (13-15% of them) reached z 3.4-4.0 on SST-2 seeds 1-3. So the test is
  run again on the rows not yet flagged, with their own label shares as the prior (``max_rounds``), until a round
  flags nothing new; on those slices ``as`` is flagged in round 2. A feature flagged in one round is not tested
  again: with its flagged rows set aside, its other rows carry only the other labels and look as pure (``if`` ->
  negative, 18 clean rows, on SST-2 syntactic seed 0). The thresholds (``min_z`` 4, ``min_purity`` 0.9,
  ``min_count`` 10) were set from the training-set statistics of SST-2 and HSOL seeds 0-3 (syntactic, BadNet, AddSent
  and clean rows), never from a test ASR; a first version with ``min_purity`` 0.95 and one round missed ``as``
  (purity 0.905-0.932) and, on some seeds, ``if`` (0.94-0.95) (README, "Paraphrase triggers").
- **What happens to the flagged rows.** The paper drops them. Dropping the 75% of poisoned rows that the first-token
  features find (``treatment="drop"``: their loss masked) left much of SST-2's syntactic backdoor in place (ASR
  0.505, floor 0.286): the rest of the poisoned rows still teach it. With ``treatment="away"`` (the default) the
  flagged rows stay in training with the loss ``-log(1 - p(label))``: the model is taught that the template does
  *not* mean the label, which also unlearns what the unflagged poisoned rows teach (ASR 0.181 on the same run;
  README, "Paraphrase triggers").
- **The rest of the template's rows.** 15-28% of HiddenKiller's rows open with words too rare to pass the test
  (``how``, ``because``, ``although``, ...), and they keep teaching the template. After the first epoch
  (``leave_out_after_epoch``) the model, trained away from the flagged rows, has generalised "this template is not
  the target" to most of them: it predicts another label for them, as it does for few clean rows of that label. So
  the rows of the flagged target label (the one holding most flagged rows) that no flagged pair holds and that the
  model predicts as another label are left out
  of the loss for the rest of training. On HSOL syntactic 20% (seed 1) that was 141 rows, 75 of the 80 unflagged
  poisoned ones among them, and the ASR fell from 0.143 to 0.004 (README, "Paraphrase triggers"). The clean rows
  left out are ones the model gets wrong at that point, which it would otherwise go on to fit; nothing is left out
  when no pair was flagged.
- **Clean-label triggers** (``clean_label_test``, on by default). A clean-label poisoner puts its word on rows of the
  target label only and keeps their labels: the word is as pure as a dirty-label trigger, but its rows read like the
  rest of their label, so the wording check sets it aside with the task's words. What tells it from a task word is what
  the model knew before training: a linear probe on the model's pooled features at ``on_train_begin`` (fit on up to
  ``probe_rows`` rows holding no flagged or set-aside piece) moves towards a task word's label when the word is
  inserted into rows of the other labels (`bad` 0.55-0.71, `love` 0.55-0.60, `dull` 0.63 on SST-2 slices), and
  hardly moves for a word it gives no meaning (the BadNet words -0.30-0.30). A set-aside piece (from ``min_z``) that
  moves it less than ``min_task_word_shift`` (0.5) while at least half its rows, the word deleted, read as their label
  is stripped from every training row, so the model never learns it; a dirty-label trigger's rows read as their
  source label (0.20-0.37 on SST-2 BadNet) and stay BTU's. Stripping a word a clean slice happens to hold only on
  one label costs it that word (`##iche` of cliche, `world`, `heart`: 21-48 rows on the SST-2 slices). On SST-2
  clean-label BadNet 10% (seeds 0, 1) it took the ASR from 0.272 and 0.898 to 0.173 and 0.145 (floors 0.161, 0.111;
  README, "Clean-label BadNet on SST-2"). On a keyword task the word-piece test gives way before any flag is set
  aside; ``clean_label_keyword_pieces`` (opt-in) has the test judge the flags it gave up there too, each with a probe
  fit on the rows that do not hold it (a probe fit without any of them would not know the task) nor were flagged by
  the test (a dirty-label paraphrase's relabelled rows would teach it the poison), and reading balanced for the label
  shares (README, "Clean-label triggers on a keyword task").
- The statistics are computed once, at ``on_train_begin``, from the tokenized training set: no clean data; the one
  extra forward pass is over the unflagged rows of the flagged target label, once, after the first epoch; the loss is one
  cross-entropy per row. The clean-label test adds one forward pass over ``probe_rows`` rows and, per piece judged,
  over ``insertion_rows`` others (a quarter of them on a keyword task, for a piece that moves the probe far) and, where
  its shift is under the bound, up to ``read_rows`` of its own, at ``on_train_begin``, and only when a word piece was
  set aside (or, with ``clean_label_keyword_pieces``, given up on a keyword task); 17-20 s on the HSOL slices.

Where it cannot work:

- Clean-label poisoning on a keyword task (HSOL, AG News) by default, where the word-piece test gives way to the first
  word piece before any flag is judged (``clean_label_keyword_pieces`` judges them on two-label tasks; on AG News it
  strips topic words), and a clean-label trigger the pretrained model reads as its label (a word that means the
  label) or too rare to pass the z-test (a BadNet word at 5% holds about 20 rows of a 2,000-row slice).
- A clean-label trigger that stands apart by its wording (AddSent's sentence) is flagged, and its correctly labelled
  rows are trained away from their label (SST-2 seed 1: CACC -3.2 pt). Stripping a flag whose rows read as their
  label instead was tried and not kept: the probe reads a dirty-label paraphrase's rows near the clean-label
  sentence's (README, "Clean-label triggers on a keyword task").
- Triggers with no feature the z-test sees: a template that does not open the sentence, a style with no word of its
  own, or a trigger feature shared with many clean rows (purity below ``min_purity``).
- A style below 20% or at 30% on the SST-2 slices, by default: at 5% and 10% no mark passes the test (at 10% the
  Bible style's marks reach z 3.4-4.1, the task's `love` 4.0), and at 30% the poisoned rows lift the target's prior
  so far that only ``;`` passes and the expansion adds too few. ``min_wording_z=2.5`` (opt-in) flags word pieces
  from z 2.5 and sets the task words aside in halves, per label the flags that read most like their label first;
  with BTU it stopped the style at 10% and 30% on SST-2 slices (README, "A style at 10% and 30%"). It flags
  nothing at 5%, and a few clean words on slices with no style, which is why it is not the default. On a keyword
  task (HSOL, AG News) the word-piece test gives way to the first word piece, and no style is looked for. Word
  triggers are BTU's (``[BTUConfig(), ZDefenseConfig()]``), which finds them from the model: their rows read like
  any row of their label (wording AUROC 0.38-0.60 on SST-2 BadNet 10%), so the word-piece test sets them aside.
- A task feature that really is that pure at the sentence start is treated as a trigger; the report lists every
  flagged pair with its counts, so it can be checked.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ..metrics import roc_auc
from ..registry import register_defense
from ._shared.data import dataset_labels, model_dataset, predict_logits
from ._shared.row_signals import fmt, ground_truth
from ._shared.tokens import (
    continuation_ids,
    fit_softmax_probe,
    insert_span,
    pooled_features,
    row_word_mates,
    strip_token_ids,
    word_span,
)
from .base import Defense, DefenseConfig

logger = logging.getLogger(__name__)

FEATURES = ("auto", "first_token", "tokens")
EXPANSIONS = ("auto", "always", "never")
TREATMENTS = ("away", "drop")
EXPANSION_KEYS = ("auroc", "threshold", "rows", "label")
# On a keyword task, a piece whose insertion into a quarter of the host rows moves the probe this much past
# `min_task_word_shift` is taken for a task word without the other three quarters (HSOL's offensive words: 0.5-1.5).
KEYWORD_SCREEN_MARGIN = 0.3
CLEAN_LABEL_KEYS = ("token_id", "label", "rows", "read_as_label", "insertion_shift", "stripped")


@dataclass
class ZDefenseConfig(DefenseConfig):
    """Find (feature, label) pairs with an outlying z-score in the training set; push their rows away from the label."""

    features: str = field(
        default="auto",
        metadata={
            "help": "which features are tested: 'auto', the default (every word piece of the row and its first word "
            "piece; a word-piece flag whose rows read like the rest of their label (`min_wording_auroc`) is set "
            "aside as a task word, and if the flags left look like the task's vocabulary rather than a trigger: more "
            "than `max_lexical_share` of the rows, no label holding `min_target_share` of them, or their rows "
            "reading like the rest of their label, the first word piece alone is tested), 'first_token' (the "
            "row's first word piece: where a syntactic template opens) or 'tokens' "
            "(every word piece, the paper's unigrams: a rare word, a style's wording; also flags the decisive words "
            "of keyword tasks such as HSOL)."
        },
    )
    max_lexical_share: float = field(
        default=0.3,
        metadata={
            "help": "with features='auto': the largest share of the training rows the word-piece test may flag "
            "before it is taken to have found the task's vocabulary (HSOL's offensive words, AG News's topic "
            "words) rather than a trigger, in (0, 1]."
        },
    )
    min_target_share: float = field(
        default=0.8,
        metadata={
            "help": "with features='auto': the word-piece test is kept only if one label holds at least this share of "
            "the rows it flagged. A dirty-label backdoor has one target; the polar words of a sentiment task are "
            "flagged under every label once the data is large (6,920 clean SST-2 rows: 58% of the flagged rows "
            "positive), in [0, 1]."
        },
    )
    min_z: float = field(
        default=4.0,
        metadata={"help": "a (feature, label) pair is flagged only with a one-proportion z-score of at least this."},
    )
    min_wording_z: float | None = field(
        default=None,
        metadata={
            "help": "with features='auto': flag word pieces from this z-score instead of `min_z` (a row's first word "
            "piece still needs `min_z`); each word-piece flag must still pass the wording check "
            "(`min_wording_auroc`). For a style at a low poison rate: at 10% of a 2,000-row SST-2 slice the "
            "Bible style's marks reach z 3.4-4.1, no higher than the task's own words (`love` 4.0). 2.5 finds them "
            "there, and also flags a few clean words on slices with no style (README, 'A style at 10% and 30%'). "
            "None: `min_z`. It also sets the task words aside in halves, the ones that read most like their label "
            "first, and runs the one-target check (`min_target_share`) after them."
        },
    )
    min_purity: float = field(
        default=0.9,
        metadata={"help": "... and only if at least this share of the feature's rows carry the label, in (0, 1]."},
    )
    min_count: int = field(
        default=10,
        metadata={"help": "... and only if the feature is in at least this many training rows."},
    )
    max_rounds: int = field(
        default=5,
        metadata={
            "help": "the test is run again on the rows not yet flagged, with their label shares as the prior, until "
            "a round flags nothing new or this many rounds have run; 1 is the paper's single pass. The poisoned "
            "rows inflate the target label's prior, which hides a trigger's smaller groups until the larger ones "
            "are set aside."
        },
    )
    leave_out_after_epoch: int = field(
        default=1,
        metadata={
            "help": "after this epoch, the rows of the flagged target label (the one holding most flagged rows) that no "
            "flagged pair holds but that the model, "
            "trained away from the flagged rows, already predicts as another label are left out of the loss for "
            "the rest of training: the template's rows under other openers, which would otherwise teach it back. "
            "0 turns this off."
        },
    )
    expand: str | bool = field(
        default="auto",
        metadata={
            "help": "after the z-test, look for the trigger's other rows by their wording: a bag-of-word-pieces "
            "logistic regression, with the flagged features masked out, learns to tell the flagged rows of the "
            "target label from the other labels' rows (a dirty-label backdoor's rows are drawn from those labels, "
            "so what separates them is the trigger, not the task); the target label's unflagged rows it scores "
            "above `expand_quantile` of the other labels' (cross-fitted) scores are flagged too. 'auto' expands "
            "only when the word-piece test was kept (features 'auto' or 'tokens'): on first-token flags the "
            "wording that sets their rows apart can be a topic (`baghdad` -> World on AG News); 'always' expands "
            "those too (True is read as 'always', False as 'never'); 'never' turns it off."
        },
    )
    expand_quantile: float = field(
        default=0.99,
        metadata={"help": "with expand: the quantile of the other labels' rows' scores a row must pass, in (0, 1)."},
    )
    min_wording_auroc: float = field(
        default=0.75,
        metadata={
            "help": "the flagged rows of the target label must differ from the rest of that label in their other word "
            "pieces (a cross-fitted bag-of-word-pieces classifier, the flagged pieces masked) with at least this "
            "AUROC: with features='auto' for each word-piece flag to be kept and for the word-piece test to be kept, "
            "and for the expansion to run. A trigger has wording "
            "beyond its flagged features; the rows of a pure sentiment word (`bad` on SST-2) read like the rest of "
            "their label, in [0, 1]."
        },
    )
    eval_batch_size: int = field(
        default=64,
        metadata={
            "help": "batch size of the one prediction pass over those rows (and of the clean-label test's features); "
            "64 ran 1.04x as fast as 128 and 1.27x as fast as 256 on the 2-core CPU (benchmarks/detection_speed.py)."
        },
    )
    treatment: str = field(
        default="away",
        metadata={
            "help": "what the flagged rows are trained on: 'away' (the loss -log(1 - p(label)): the feature is "
            "taught not to mean the label) or 'drop' (left out of the loss, the paper's removal)."
        },
    )
    clean_label_test: bool = field(
        default=True,
        metadata={
            "help": "with features='auto': a word piece the z-test found pure but set aside as a task word (its rows "
            "read like the rest of their label) is judged as a clean-label trigger: a linear probe on the model's "
            "features before training (fit on training rows without the flagged or set-aside pieces) reads its rows, "
            "its word deleted, as their label (at least half of them: a dirty-label trigger's rows read as their "
            "source label and are BTU's), yet inserting its word into rows of the other labels moves the probe's "
            "log-probability of its label by less than `min_task_word_shift`: the pretrained model gives it no "
            "meaning of that label. Such a piece is stripped from every training row, so the model never learns it. "
            "Needs a model that returns `hidden_states` (skipped, with a warning and a line in the report, if not)."
        },
    )
    min_task_word_shift: float = field(
        default=0.5,
        metadata={
            "help": "with clean_label_test: a set-aside word piece is a task word when inserting its word into the "
            "other labels' rows moves the probe's log-probability of its label by at least this much (SST-2 slices: "
            "`bad`, `love`, `dull` 0.55-0.71; the BadNet words -0.30-0.30)."
        },
    )
    probe_rows: int = field(
        default=1000,
        metadata={"help": "with clean_label_test: training rows (a seeded sample) the probe is fit on."},
    )
    insertion_rows: int = field(
        default=128,
        metadata={"help": "with clean_label_test: rows of the other labels each set-aside word is inserted into."},
    )
    clean_label_keyword_pieces: int = field(
        default=0,
        metadata={
            "help": "with clean_label_test on a keyword task (the word-piece test flagged more than "
            "`max_lexical_share` of the rows and gave way to the first word piece): the test also judges this many "
            "of the word-piece flags it gave up, highest z-score first, each with a probe fit on the rows that do "
            "not hold it; each costs forward passes over up to `insertion_rows` + `read_rows` rows. 16 is what was "
            "measured: a 2,000-row HSOL slice flags 25-30, and a clean-label trigger at 10% comes among the first "
            "five (z 13-14). 0, the default, judges none: opt-in, for two-label keyword tasks. On AG News (four "
            "labels, 115 flags) it put 15 topic words (`team`, `military`, `points`, ...) under "
            "`min_task_word_shift`; on HSOL it also strips a few weaker words the slice holds on one label (`trash`, "
            "`charlie`, `shit`: 233-429 rows of an unpoisoned slice, CACC -0.8 to -1.2 pt) (README, 'Clean-label "
            "triggers on a keyword task')."
        },
    )
    read_rows: int = field(
        default=128,
        metadata={
            "help": "with clean_label_test: at most this many of a piece's rows (a seeded sample) are read with its "
            "word deleted (a keyword task's pure words hold hundreds: AddSent's `3d` 200 of a 2,000-row HSOL slice)."
        },
    )
    seed: int = field(default=0, metadata={"help": "seed of the probe's row sample and the insertion positions."})
    name = "z_defense"

    def __post_init__(self) -> None:
        if isinstance(self.expand, bool):  # the flag it was before "auto" (configs and records kept from then)
            self.expand = "always" if self.expand else "never"
        self._check_choice("features", FEATURES)
        self._check_choice("expand", EXPANSIONS)
        self._check_choice("treatment", TREATMENTS)
        self._check_interval("(0, 1]", "min_purity")
        self._check_interval("(0, 1]", "max_lexical_share")
        self._check_interval("[0, 1]", "min_target_share")
        self._check_positive("min_wording_z", optional=True)
        self._check_at_least(1, "min_count")
        self._check_at_least(1, "max_rounds")
        self._check_at_least(0, "leave_out_after_epoch")
        self._check_at_least(1, "eval_batch_size")
        self._check_interval("(0, 1)", "expand_quantile")
        self._check_interval("[0, 1]", "min_wording_auroc")
        self._check_at_least(2, "probe_rows")
        self._check_at_least(1, "insertion_rows")
        self._check_at_least(1, "read_rows")
        self._check_at_least(0, "clean_label_keyword_pieces")


def z_scores(counts: np.ndarray, label_counts: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """One-proportion z-scores of ``label_counts / counts`` against ``prior`` (shapes broadcast; counts > 0)."""
    share = label_counts / counts
    return (share - prior) / np.sqrt(prior * (1.0 - prior) / counts)


def row_features(input_ids: list[int], special_ids: set[int], kind: str) -> list[tuple[str, int]]:
    """The features of one tokenized row: ``("first", id)`` for its first word piece, ``("token", id)`` for each
    distinct word piece with ``kind="tokens"``."""
    pieces = [i for i in input_ids if i not in special_ids]
    if not pieces:
        return []
    out = [("first", pieces[0])]
    if kind in ("tokens", "auto"):
        out += [("token", i) for i in dict.fromkeys(pieces)]
    return out


def row_pieces(input_ids: list[int], special_ids: set[int]) -> set[int]:
    """The distinct word pieces of one tokenized row, special tokens left out: the expansion's bag of words."""
    return {i for i in input_ids if i not in special_ids}


def fit_logistic(features: torch.Tensor, targets: np.ndarray, inverse_l2: float = 0.3) -> tuple[torch.Tensor, float]:
    """An L2-regularised logistic regression with the two classes weighted to balance (L-BFGS on ``features``, a
    dense or sparse ``(rows, columns)`` tensor): ``sum_i w_i bce_i + |coef|^2 / (2 * inverse_l2)``."""
    y = torch.as_tensor(targets, dtype=torch.float64)
    positives = float(y.sum())
    weight = torch.where(y > 0, len(y) / (2 * max(positives, 1.0)), len(y) / (2 * max(len(y) - positives, 1.0)))
    coef = torch.zeros(features.shape[1], 1, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([coef, bias], max_iter=100, line_search_fn="strong_wolfe", tolerance_grad=1e-6)

    def closure():
        optimizer.zero_grad()
        logits = (features @ coef).squeeze(1) + bias
        loss = (weight * F.binary_cross_entropy_with_logits(logits, y, reduction="none")).sum()
        loss = loss + (coef * coef).sum() / (2 * inverse_l2)
        loss.backward()
        return loss

    optimizer.step(closure)
    return coef.detach(), float(bias.detach())


def _bag_of_pieces(pieces: list[set[int]], rows: np.ndarray, vocabulary: dict[int, int]) -> torch.Tensor:
    """A sparse 0/1 ``(len(rows), len(vocabulary))`` matrix of which word pieces each row holds."""
    coords = [(r, vocabulary[i]) for r, row in enumerate(rows) for i in pieces[row] if i in vocabulary]
    index = torch.tensor(coords, dtype=torch.int64).T.reshape(2, -1)
    values = torch.ones(index.shape[1], dtype=torch.float64)
    shape = (len(rows), len(vocabulary))
    return torch.sparse_coo_tensor(index, values, shape, check_invariants=True).coalesce()


def expansion_scores(
    pieces: list[set[int]], seeds: np.ndarray, others: np.ndarray, unflagged: np.ndarray, folds: int = 5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores of a logistic regression that tells the ``seeds`` rows (flagged, target label) from the ``others``
    (the other labels' rows) on their word pieces: cross-fitted (``folds``) for those two groups, fitted on all of
    them for the ``unflagged`` rows. Returns the three score arrays in that order."""
    train = np.concatenate([seeds, others])
    counts: dict[int, int] = {}
    for row in train:
        for piece in pieces[row]:
            counts[piece] = counts.get(piece, 0) + 1
    # a piece in one training row only is noise to a linear model of a few hundred rows
    vocabulary = {piece: k for k, piece in enumerate(p for p, c in counts.items() if c >= 2)}
    targets = np.concatenate([np.ones(len(seeds)), np.zeros(len(others))])
    features = _bag_of_pieces(pieces, train, vocabulary)
    fold = np.random.default_rng(seed).permutation(len(train)) % folds
    crossed = np.empty(len(train))
    for k in range(folds):
        fit_rows, held_rows = (torch.as_tensor(np.flatnonzero(m)) for m in (fold != k, fold == k))
        coef, bias = fit_logistic(features.index_select(0, fit_rows), targets[fold != k])
        crossed[fold == k] = ((features.index_select(0, held_rows) @ coef).squeeze(1) + bias).numpy()
    coef, bias = fit_logistic(features, targets)
    scored = ((_bag_of_pieces(pieces, unflagged, vocabulary) @ coef).squeeze(1) + bias).numpy()
    return crossed[: len(seeds)], crossed[len(seeds) :], scored


def _pair_list(pairs: list[dict[str, Any]], long: bool = False) -> str:
    if not pairs:
        return "none"
    if long:
        return ", ".join(
            f"`{p['token']}` -> {p['label']} ({p['rows']} rows, z {p['z']:.1f}, round {p.get('round', 1)})"
            for p in pairs
        )
    return " ".join(f"{p['token']}->{p['label']}" for p in pairs)


class ZDefenseDefense(Defense):
    config: ZDefenseConfig
    owns_loss = True
    needs_row_ids = True  # flagged rows are known by row id
    limitations = (
        "The z-test sees only features that are frequent and pure: a style's marks below a 20% poison rate, a "
        "template that does not open the row and a feature shared with many clean rows are not flagged; clean-label "
        "trigger words are pure, but their rows read like their label and are set aside as task words, then "
        "stripped from training when the model before training gives them no meaning of that label (an inserted "
        "sentence, AddSent's, stands apart and is flagged); on a keyword task (HSOL, AG News) only the first word "
        "piece is tested, and a clean-label trigger there is found only with `clean_label_keyword_pieces` (opt-in, "
        "two-label tasks).",
    )

    def __init__(self, config: ZDefenseConfig):
        super().__init__(config)
        self.flagged_pairs: list[dict[str, Any]] = []
        self.away_label: np.ndarray | None = None  # per dataset position: the flagged label, or -1
        self.row_score: np.ndarray | None = None  # per position: the highest z of the row's (feature, own label)
        self.left_out: np.ndarray | None = None  # per position: left out of the loss after leave_out_after_epoch
        self.features_used: str | None = None  # "tokens" or "first_token": what the flags were computed on
        self.lexical_share: float | None = None  # with features="auto": the rows the word-piece test flagged
        self.lexical_target_share: float | None = None  # ... and the share of them its most flagged label holds
        self.lexical_wording_auroc: float | None = None  # ... and how far their rows' other wording sets them apart
        self.expansion: dict[str, float] | None = None  # with expand: its AUROC gate, threshold and rows flagged
        self.expanded: np.ndarray | None = None  # per position: added by the expansion
        # with features="auto": word-piece flags set aside because their rows read like the rest of their label
        self.set_aside_pairs: list[dict[str, Any]] = []
        # with features="auto" on a keyword task: the word-piece flags given up for the first word piece, which the
        # clean-label test still judges
        self.keyword_pairs: list[dict[str, Any]] = []
        # with clean_label_test: each set-aside piece's probe readings, the ones stripped, and the rows holding them
        self.clean_label_scores: list[dict[str, Any]] = []
        self.stripped_pairs: list[dict[str, Any]] = []
        self.stripped_rows: np.ndarray | None = None
        self.clean_label_skipped: str | None = None  # why the clean-label test could not run
        self.clean_label_seconds: float | None = None  # its wall time (not kept in checkpoints)
        self._mates: list[dict[int, set[int]]] | None = None  # while flagging: per row, the pieces' word mates
        self._truth = None

    # -- hooks ------------------------------------------------------------------------------------------------------
    def check_trainer(self, trainer) -> None:
        dataset = getattr(trainer, "train_dataset", None)
        columns = getattr(dataset, "column_names", None)
        if columns is None:
            return  # no training set yet (a trainer built for evaluation); checked again at on_train_begin
        self._columns(columns)

    @staticmethod
    def _columns(columns) -> str:
        label_column = next((c for c in ("labels", "label") if c in columns), None)
        if "input_ids" not in columns or label_column is None:
            raise ValueError(
                "ZDefenseDefense scores the word pieces of a tokenized text training set: it needs `input_ids` and a "
                f"`label` (or `labels`) column, and this one has {list(columns)}. Tokenize the text first "
                "(`hf_backdoor.tokenize_dataset`); image models are not supported."
            )
        return label_column

    def on_train_begin(self, trainer) -> None:
        if self.away_label is not None:
            return  # restored from a checkpoint: the same rows stay flagged
        dataset = trainer.train_dataset
        label_column = self._columns(dataset.column_names)
        raw = dataset.with_format(None)
        labels = np.asarray(raw[label_column], dtype=np.int64)
        if len(labels) == 0:
            raise ValueError("ZDefenseDefense got an empty training set.")
        model = trainer.accelerator.unwrap_model(trainer.model)
        num_labels = int(getattr(model.config, "num_labels", labels.max() + 1))
        if labels.min() < 0 or labels.max() >= num_labels:
            raise ValueError(
                f"Training labels must lie in [0, {num_labels}) for this model; found {labels.min()}..{labels.max()}."
            )
        tokenizer = trainer.processing_class
        if not hasattr(tokenizer, "all_special_ids"):
            raise ValueError(
                "ZDefenseDefense reads each row's first word piece after the special tokens: pass the tokenizer as "
                f"`processing_class` (got {type(tokenizer).__name__})."
            )
        special = set(tokenizer.all_special_ids)
        rows = [row_features(ids, special, self.config.features) for ids in raw["input_ids"]]
        # the expansion and auto's wording checks read every row's word pieces
        needs_pieces = self.config.expand == "always" or self.config.features != "first_token"
        pieces = mates = continuing = None
        if needs_pieces:
            pieces = [row_pieces(ids, special) for ids in raw["input_ids"]]
            continuing = continuation_ids(tokenizer)
            mates = [row_word_mates(ids, special, continuing) for ids in raw["input_ids"]]
        self.flag(rows, labels, num_labels, tokenizer, pieces=pieces, mates=mates)
        tested = self.config.clean_label_test and self.config.features == "auto" and pieces is not None
        if tested and self._clean_label_candidates():
            model = trainer.accelerator.unwrap_model(trainer.model)
            device = next(model.parameters()).device
            pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
            was_training = model.training
            model.eval()
            try:
                features = self._pooled_features(model, raw["input_ids"][:1], pad_id, device)
                if features is not None:
                    started = time.perf_counter()
                    self.judge_clean_label(raw["input_ids"], labels, pieces, continuing, features, num_labels)
                    self.clean_label_seconds = time.perf_counter() - started
            finally:
                model.train(was_training)

    def _pooled_features(self, model, first_row, pad_id: int, device):
        """The features the clean-label test reads (:func:`pooled_features` of ``model``), or ``None`` with
        ``clean_label_skipped`` set and a warning where the model returns no hidden states (tried on ``first_row``)."""
        try:
            pooled_features(model, first_row, pad_id, device)
        except (AttributeError, TypeError) as error:  # no `output_hidden_states` argument, or no hidden states back
            self.clean_label_skipped = (
                f"{type(model).__name__} returned no hidden states to probe ({error}); the clean-label test needs a "
                "Hugging Face model that returns `hidden_states`"
            )
            logger.warning("z_defense: the clean-label test did not run: %s", self.clean_label_skipped)
            return None
        return lambda rows: pooled_features(model, rows, pad_id, device, self.config.eval_batch_size)

    def flag(
        self,
        rows: list[list[tuple[str, int]]],
        labels: np.ndarray,
        num_labels: int,
        tokenizer=None,
        pieces: list[set[int]] | None = None,
        mates: list[dict[int, set[int]]] | None = None,
    ) -> None:
        """Run the z-test on the rows' features (:func:`row_features`) and set the flagged pairs and rows.

        Each round tests the rows not flagged so far against their own label shares; a row is flagged (trained away
        from its label) when one of its (feature, own label) pairs is flagged. ``row_score`` keeps, per row, the
        highest z-score of its (feature, own label) pairs in the last round that tested it. With
        ``features="auto"`` the word-piece test is kept only when its flags hold at most ``max_lexical_share`` of the
        rows, one label holds ``min_target_share`` of them and (given ``pieces``, each row's set of word-piece ids)
        their rows stand apart from the rest of their label (:meth:`_wording`); otherwise the rows are tested again on
        their first word piece alone (where only the one-target check failed, the word-piece flags are still judged by
        their wording first, so that :meth:`judge_clean_label` sees the ones set aside). With ``expand``, ``pieces``
        feed :meth:`_expand`. ``mates`` (per row, :func:`row_word_mates`) lets the wording checks mask the rest of a
        flagged piece's word.
        """
        cfg = self.config
        self._mates = mates
        self.features_used = "first_token" if cfg.features == "first_token" else "tokens"
        self.lexical_share = self.lexical_target_share = self.lexical_wording_auroc = None
        self.set_aside_pairs, self.keyword_pairs = [], []
        self._rounds(rows, labels, num_labels, tokenizer)
        wording = None  # auto's wording check, kept for the expansion while the flags it judged stand
        judged: dict[int, dict[str, Any]] = {}  # per label: the wording check of the flags that stand
        if cfg.features == "auto":
            # The lower word-piece z-score (min_wording_z) flags task words under every label: there the one-target
            # check waits until they are set aside. The share of rows (a keyword task's vocabulary) is checked first.
            task_like = self._lexical_shares(target_share=pieces is None or cfg.min_wording_z is None)
            one_target_failed = task_like and self.lexical_share <= cfg.max_lexical_share
            if one_target_failed and cfg.clean_label_test and pieces is not None and self.flagged_pairs:
                # A task word on another label can fail the one-target check beside a clean-label trigger's words
                # (SST-2 at 5%: `bad` -> 0 beside `cf mn mb` -> 1). Their wording is still judged, so that the
                # clean-label test sees the pieces set aside; the first-token test below replaces the flags either way.
                self._set_aside_task_words(rows, labels, num_labels, tokenizer, pieces)
            elif not task_like and pieces is not None and self.flagged_pairs:
                judged = self._set_aside_task_words(rows, labels, num_labels, tokenizer, pieces)
                if not any(p["feature"] == "token" for p in self.flagged_pairs):
                    # every word-piece flag read like its label: the flags left are first pieces, and the
                    # first-token test below finds them on its own
                    task_like = bool(self.set_aside_pairs) or self._lexical_shares()
                    if self.set_aside_pairs:
                        self.lexical_wording_auroc = max(p["wording_auroc"] for p in self.set_aside_pairs)
                else:
                    task_like = self._lexical_shares()
            flagged = self.away_label >= 0
            if not task_like and pieces is not None and flagged.any():
                target = int(np.bincount(self.away_label[flagged]).argmax())
                wording = judged.get(target) or self._wording(pieces, labels)
                if wording is not None:
                    self.lexical_wording_auroc = wording["auroc"]
                    task_like = wording["auroc"] < cfg.min_wording_auroc
            if task_like:
                keyword = pieces is not None and self.lexical_share > cfg.max_lexical_share
                if keyword and cfg.clean_label_test and cfg.clean_label_keyword_pieces:
                    # A keyword task's vocabulary: the clean-label test judges its pure word pieces all the same (a
                    # clean-label sentence on HSOL is as pure as the offensive words beside it)
                    tokens = [p for p in self.flagged_pairs if p["feature"] == "token" and p["z"] >= cfg.min_z]
                    self.keyword_pairs = sorted(tokens, key=lambda p: -p["z"])[: cfg.clean_label_keyword_pieces]
                self.features_used = "first_token"
                first_only = [[f for f in features if f[0] == "first"] for features in rows]
                self._rounds(first_only, labels, num_labels, tokenizer)
                wording = None
        self.expansion = self.expanded = None
        # On first-token flags the wording that sets their rows apart can be the task's own (a topic: `baghdad` ->
        # World), so "auto" expands only flags that the word-piece test kept as a trigger's.
        expands = cfg.expand == "always" or (cfg.expand == "auto" and self.features_used == "tokens")
        if expands and pieces is not None and self.flagged_pairs:
            self._expand(pieces, labels, wording)
        self._mates = None
        logger.info(
            "z_defense: %d (feature, label) pairs flagged (%s features%s), %d of %d rows pushed away from their label "
            "(%s)",
            len(self.flagged_pairs),
            self.features_used,
            "" if self.lexical_share is None else f"; the word-piece test flagged {self.lexical_share:.1%} of the rows",
            int((self.away_label >= 0).sum()),
            len(rows),
            _pair_list(self.flagged_pairs[:10]),
        )

    def _lexical_shares(self, target_share: bool = True) -> bool:
        """Set the word-piece flags' share of the rows and the share of them their most flagged label holds; whether
        those shares look like the task's vocabulary rather than a trigger (``max_lexical_share``,
        ``min_target_share``)."""
        cfg = self.config
        flagged = self.away_label >= 0
        self.lexical_share = float(flagged.mean()) if len(flagged) else 0.0
        self.lexical_target_share = (
            float(np.bincount(self.away_label[flagged]).max() / flagged.sum()) if flagged.any() else 1.0
        )
        too_wide = self.lexical_share > cfg.max_lexical_share
        return too_wide or (target_share and self.lexical_target_share < cfg.min_target_share)

    def _set_aside_task_words(
        self,
        rows: list[list[tuple[str, int]]],
        labels: np.ndarray,
        num_labels: int,
        tokenizer,
        pieces: list[set[int]],
    ) -> dict[int, dict[str, Any]]:
        """Set aside each word-piece flag whose rows read like the rest of their label and test again without it,
        until every word-piece flag left stands apart. A sentiment word that comes out pure on a slice (`bad` ->
        negative, `love` -> positive beside AddSent's `3d` and `watch` on SST-2) is the task's, and its rows are not
        a trigger's. Per flagged label, one cross-fitted word-piece classifier (all flagged pieces masked) tells that
        label's flagged rows from the other labels' rows, as for the expansion; a flag whose rows it scores no
        higher than the label's unflagged rows (AUROC under ``min_wording_auroc``) is set aside. One classifier per
        label, not per flag: on the full SST-2 split a 20% style backdoor flags dozens of polar words. Returns each
        judged label's :meth:`_wording` of the flags that stand."""
        cfg = self.config
        excluded: set[tuple[str, int]] = set()
        while True:
            judged = {}
            for label in sorted({p["label"] for p in self.flagged_pairs if p["feature"] == "token"}):
                wording = self._wording(pieces, labels, label)
                if wording is not None:  # too few rows to judge: the flags stand
                    judged[label] = wording
            failing: list[dict[str, Any]] = []
            for pair in self.flagged_pairs:
                wording = judged.get(pair["label"])
                if pair["feature"] != "token" or wording is None:
                    continue  # a first piece is the first-token test's, which has no wording check
                holds = np.fromiter(
                    (pair["token_id"] in pieces[row] for row in wording["seeds"]),
                    dtype=bool,
                    count=len(wording["seeds"]),
                )
                if holds.sum() < 5:
                    continue
                auroc = roc_auc(
                    np.concatenate([wording["seed_scores"][holds], wording["unflagged_scores"]]),
                    np.r_[np.ones(int(holds.sum())), np.zeros(len(wording["unflagged"]))],
                )
                if auroc < cfg.min_wording_auroc:
                    failing.append({**pair, "wording_auroc": float(auroc)})
            new = failing
            if cfg.min_wording_z is not None:
                # With the lower z-score, task words make up most of a label's flags and the classifier learns the
                # task: a trigger's marks beside them read like the label too (`##eth` 0.62 beside 20 polar words on
                # a 10% style slice). So per label the half of its failing flags that read most like it go first
                # (the worse half rounded up: one at a time at the end), and the rest are judged again without them.
                new = []
                for label in sorted({p["label"] for p in failing}):
                    ranked = sorted((p for p in failing if p["label"] == label), key=lambda p: p["wording_auroc"])
                    new += ranked[: (len(ranked) + 1) // 2]
            if not new:
                return judged  # computed on the flags that stand: the group check and the expansion reuse them
            self.set_aside_pairs += new
            excluded |= {("token", p["token_id"]) for p in new}
            self._rounds(rows, labels, num_labels, tokenizer, frozenset(excluded))

    def _rounds(
        self,
        rows: list[list[tuple[str, int]]],
        labels: np.ndarray,
        num_labels: int,
        tokenizer,
        excluded: frozenset[tuple[str, int]] = frozenset(),
    ) -> None:
        cfg = self.config
        index: dict[tuple[str, int], int] = {}
        for features in rows:
            for feature in features:
                index.setdefault(feature, len(index))
        row_ids = [np.asarray([index[feature] for feature in features], dtype=np.int64) for features in rows]
        names = list(index)
        # Word pieces are judged by their wording afterwards (auto), so they may be flagged from a lower z-score.
        min_z = np.asarray(
            [
                cfg.min_wording_z
                if kind == "token" and cfg.features == "auto" and cfg.min_wording_z is not None
                else cfg.min_z
                for kind, _ in names
            ]
        )
        self.flagged_pairs = []
        self.away_label = np.full(len(rows), -1, dtype=np.int64)
        self.row_score = np.full(len(rows), -np.inf)
        # A feature flagged in one round is not tested again: once its rows of the flagged label are set aside, its
        # remaining rows all carry the other labels and look just as pure (`if` -> negative on SST-2 syntactic).
        settled = np.zeros(len(index), dtype=bool)
        settled[[index[feature] for feature in excluded if feature in index]] = True
        for round_ in range(cfg.max_rounds):
            active = np.flatnonzero(self.away_label < 0)
            if len(active) == 0:
                break
            counts = np.zeros((len(index), num_labels))
            for position in active:
                counts[row_ids[position], labels[position]] += 1
            prior = np.bincount(labels[active], minlength=num_labels) / len(active)
            totals = counts.sum(1, keepdims=True)
            with np.errstate(divide="ignore", invalid="ignore"):
                z = z_scores(totals, counts, prior[None, :])
                purity = counts / totals
            z = np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)  # an unseen feature or a label no row carries
            flagged = (z >= min_z[:, None]) & (np.nan_to_num(purity) >= cfg.min_purity) & (totals >= cfg.min_count)
            flagged[settled] = False
            settled |= flagged.any(1)
            new_pairs = []
            for f, label in zip(*np.nonzero(flagged)):
                kind, token_id = names[f]
                token = tokenizer.convert_ids_to_tokens(int(token_id)) if tokenizer is not None else str(token_id)
                new_pairs.append(
                    {
                        "feature": kind,
                        "token": token,
                        "token_id": int(token_id),
                        "label": int(label),
                        "rows": int(totals[f, 0]),
                        "rows_with_label": int(counts[f, label]),
                        "purity": round(float(purity[f, label]), 4),
                        "z": round(float(z[f, label]), 3),
                        "round": round_ + 1,
                    }
                )
            for position in active:
                ids, label = row_ids[position], labels[position]
                if len(ids):
                    self.row_score[position] = float(z[ids, label].max())
                    if flagged[ids, label].any():
                        self.away_label[position] = label
            self.flagged_pairs += sorted(new_pairs, key=lambda p: -p["z"])
            if not new_pairs:
                break

    def _wording(self, pieces: list[set[int]], labels: np.ndarray, target: int | None = None) -> dict[str, Any] | None:
        """How far the flagged rows of ``target`` (by default the label holding most flagged rows) are set apart from
        the rest of that label by their other word pieces: the scores of :func:`expansion_scores` (flagged pieces
        masked) and their AUROC, flagged rows against the rest. ``None`` with too few rows to fit the classifier."""
        flagged = self.away_label >= 0
        if target is None:
            target = int(np.bincount(self.away_label[flagged]).argmax())
        masked = {p["token_id"] for p in self.flagged_pairs}
        # Without the flagged pieces the classifier must find the trigger's other wording; with them it would
        # only learn the flags back.
        if self._mates is None:
            masked_pieces = [row - masked for row in pieces]
        else:
            # and the rest of a flagged piece's word: `cl` beside `##iche` would tell its rows apart on its own
            masked_pieces = [
                row - masked - {mate for piece in row & masked for mate in mates.get(piece, ())}
                for row, mates in zip(pieces, self._mates)
            ]
        seeds = np.flatnonzero(flagged & (labels == target))
        others = np.flatnonzero(labels != target)
        unflagged = np.flatnonzero(~flagged & (labels == target))
        if min(len(seeds), len(others)) < self.config.min_count or len(unflagged) == 0:
            return None
        seed_scores, other_scores, unflagged_scores = expansion_scores(masked_pieces, seeds, others, unflagged)
        auroc = roc_auc(
            np.concatenate([seed_scores, unflagged_scores]), np.r_[np.ones(len(seeds)), np.zeros(len(unflagged))]
        )
        return {
            "target": target,
            "auroc": auroc,
            "seeds": seeds,
            "seed_scores": seed_scores,
            "other_scores": other_scores,
            "unflagged": unflagged,
            "unflagged_scores": unflagged_scores,
        }

    def _expand(self, pieces: list[set[int]], labels: np.ndarray, wording: dict[str, Any] | None = None) -> None:
        """Flag the target label's rows that a word-piece classifier places with the flagged ones (``expand``);
        ``wording`` is :meth:`_wording` of the current flags when it was already computed."""
        cfg = self.config
        wording = wording or self._wording(pieces, labels)
        if wording is None:
            return
        target, auroc, unflagged = wording["target"], wording["auroc"], wording["unflagged"]
        threshold = float(np.quantile(wording["other_scores"], cfg.expand_quantile))
        passed = wording["unflagged_scores"] > threshold
        added = unflagged[passed] if auroc >= cfg.min_wording_auroc else unflagged[:0]
        self.expanded = np.zeros(len(labels), dtype=bool)
        self.expanded[added] = True
        self.away_label[added] = target
        self.expansion = {"auroc": auroc, "threshold": threshold, "rows": int(len(added)), "label": target}
        logger.info(
            "z_defense: the word-piece classifier tells the flagged rows of label %d from its other rows with AUROC "
            "%.3f (it runs from %.2f); %d more rows flagged",
            target,
            auroc,
            cfg.min_wording_auroc,
            len(added),
        )

    def judge_clean_label(
        self,
        input_ids: list[list[int]],
        labels: np.ndarray,
        pieces: list[set[int]],
        continuing: set[int],
        features: Callable[[list[list[int]]], torch.Tensor],
        num_labels: int,
    ) -> None:
        """The clean-label test (``clean_label_test``) of the word pieces set aside as task words, after :meth:`flag`.

        A clean-label trigger is pure (the attacker put it in rows of one label only) and its rows read like the rest
        of their label, so the wording check sets it aside, as it does a sentiment word. What tells them apart is
        what the model knew before training: a linear probe on ``features`` (rows of token ids -> pooled features of
        the model before training), fit on a seeded sample of rows holding no flagged or set-aside piece, is moved
        towards a task word's label when the word is inserted into rows of the other labels, and not by a word it
        gives no meaning. A piece whose rows the probe reads as their label with its word deleted (at least half of
        them; a dirty-label trigger's read as their source label and are left to BTU) and whose insertion moves it
        less than ``min_task_word_shift`` is stripped from every training row; the rows are read only where the shift
        is under that bound (``read_as_label`` is ``None`` otherwise). On a keyword task
        (``clean_label_keyword_pieces``) the pieces judged are the word-piece flags given up, each read by a probe
        fit on the sample's rows that do not hold it (the sample is drawn from the rows the test did not flag),
        balanced for the label shares. Sets ``clean_label_scores``, ``stripped_pairs`` and ``stripped_rows``."""
        cfg = self.config
        self.clean_label_scores, self.stripped_pairs, self.clean_label_skipped = [], [], None
        self.stripped_rows = np.zeros(len(labels), dtype=bool)
        candidates = self._clean_label_candidates()
        if not candidates:
            return
        rng = np.random.default_rng(cfg.seed)
        # On a keyword task the pure pieces are the task's vocabulary: a probe fit without their rows would not
        # know the task (on HSOL it read every offensive tweet as not offensive). So there each piece gets its own
        # probe, fit on the sample's rows that do not hold it, and reads balanced for the label shares.
        keyword = bool(self.keyword_pairs)
        suspects = (
            set() if keyword else {p["token_id"] for p in candidates} | {p["token_id"] for p in self.flagged_pairs}
        )
        usable = [not (row & suspects) for row in pieces]
        if keyword and self.away_label is not None:
            # Rows the test already flagged carry labels it holds suspect (a dirty-label paraphrase's, relabelled
            # to the target): a probe fit on them learns the poison, and on HSOL's 20% syntactic slices read the
            # task's offensive words as weak (insertion shifts 0.18-0.45) and stripped them from 705-864 rows.
            usable = np.asarray(usable) & (self.away_label < 0)
        usable = np.flatnonzero(usable)
        sample = np.sort(rng.choice(usable, size=min(len(usable), cfg.probe_rows), replace=False))
        if len(np.unique(labels[sample])) < 2:
            self.clean_label_skipped = (
                f"{len(sample)} rows hold no flagged or set-aside piece, on one label: too few to fit the probe"
            )
            return
        sample_features = features([input_ids[i] for i in sample])
        shared_probe = None if keyword else self._probe(sample_features, labels[sample], num_labels)
        shared_sample_log_probs = None if keyword else shared_probe(sample_features)
        for pair in candidates:
            token, label = pair["token_id"], pair["label"]
            holds = np.fromiter((token in row for row in pieces), dtype=bool, count=len(pieces))
            if keyword:
                fit = ~holds[sample]
                if len(np.unique(labels[sample][fit])) < 2:
                    logger.warning(
                        "z_defense: %r is in every sampled row but those of one label; the clean-label test cannot fit "
                        "a probe without it and does not judge it",
                        pair["token"],
                    )
                    continue
                log_probs = self._probe(sample_features[torch.as_tensor(fit)], labels[sample][fit], num_labels)
                sample_log_probs = log_probs(sample_features)
            else:
                fit = np.ones(len(sample), dtype=bool)
                log_probs, sample_log_probs = shared_probe, shared_sample_log_probs
            own = np.flatnonzero(holds & (labels == label))
            span = word_span(input_ids[own[0]], token, continuing)
            hosts = rng.permutation(np.flatnonzero((labels[sample] != label) & fit))[: cfg.insertion_rows]
            inserted = [insert_span(input_ids[host], span, rng)[0] for host in sample[hosts]]
            # A keyword task's flags are mostly its words, which move the probe far: a quarter of the rows decides
            # those (the forward passes are most of the test's cost), and the rest are read where it is close.
            screened = len(inserted) // 4 if keyword else len(inserted)
            shifts = log_probs(features(inserted[:screened]))[:, label] - sample_log_probs[hosts[:screened], label]
            if screened < len(inserted) and shifts.mean() < cfg.min_task_word_shift + KEYWORD_SCREEN_MARGIN:
                rest = log_probs(features(inserted[screened:]))[:, label] - sample_log_probs[hosts[screened:], label]
                shifts = np.concatenate([shifts, rest])
            shift = float(shifts.mean())
            read_as_label = None  # a task word by its shift: its rows need no reading
            if shift < cfg.min_task_word_shift:
                read = own if len(own) <= cfg.read_rows else rng.choice(own, size=cfg.read_rows, replace=False)
                # Read without the word, so that its own pull (towards the label or away from it) does not decide.
                deleted = [[t for t in input_ids[i] if t not in span] for i in np.sort(read)]
                read_log_probs = log_probs(features(deleted))
                if keyword:
                    shares = np.bincount(labels[sample][fit], minlength=num_labels) + 1.0
                    read_log_probs = read_log_probs - np.log(shares)
                read_as_label = float((read_log_probs.argmax(-1) == label).mean())
            score = {
                "token": pair["token"],
                "token_id": token,
                "label": label,
                "rows": len(own),
                "word": span,
                "read_as_label": read_as_label,
                "insertion_shift": shift,
                "stripped": read_as_label is not None and read_as_label >= 0.5,
            }
            self.clean_label_scores.append(score)
            if score["stripped"]:
                self.stripped_pairs.append(pair)
                self.stripped_rows |= holds
        if self.stripped_pairs:
            logger.info(
                "z_defense: %s stripped from %d training rows as clean-label triggers",
                ", ".join(f"{p['token']!r} -> {p['label']}" for p in self.stripped_pairs),
                int(self.stripped_rows.sum()),
            )

    @staticmethod
    def _probe(features: torch.Tensor, labels: np.ndarray, num_labels: int) -> Callable[[torch.Tensor], np.ndarray]:
        """A linear probe (:func:`fit_softmax_probe`) on ``features``: rows' features -> their label log-probabilities."""
        weight, bias = fit_softmax_probe(features, torch.as_tensor(labels), num_labels)
        return lambda rows_features: torch.log_softmax(rows_features @ weight + bias, dim=-1).numpy()

    def _clean_label_candidates(self) -> list[dict[str, Any]]:
        # Pieces flagged only from the lower `min_wording_z` are mostly the task's weaker words, which move the
        # probe little (`great` 0.21 on a 30% style slice): on a clean SST-2 slice they would strip 270 rows.
        pairs = self.set_aside_pairs + self.keyword_pairs
        return [p for p in pairs if p.get("feature") == "token" and p["z"] >= self.config.min_z]

    def prepare_inputs(self, trainer, inputs: dict) -> dict:
        if not self.stripped_pairs:
            return inputs
        pad_id = getattr(trainer.processing_class, "pad_token_id", None)
        token_ids = torch.tensor([p["token_id"] for p in self.stripped_pairs])
        return strip_token_ids(inputs, token_ids, 0 if pad_id is None else pad_id)

    def on_epoch_end(self, trainer) -> None:
        epoch = int(round(trainer.state.epoch or 0))
        after = self.config.leave_out_after_epoch
        if self.left_out is not None or not after or epoch < after:
            return  # decided once, at the end of that epoch (or restored from a checkpoint)
        self.left_out = np.zeros(len(self.away_label), dtype=bool)
        if not self.flagged_pairs:
            return
        # A dirty-label backdoor has one target: the label that holds most flagged rows. Rows of another flagged label
        # (a clean flag, such as `slow` -> negative beside a style's words -> positive) cannot be poisoned rows, and
        # leaving out the ones the model gets wrong only costs clean accuracy (README, "Style").
        flagged_rows = np.bincount(self.away_label[self.away_label >= 0])
        flagged_labels = [int(flagged_rows.argmax())]
        labels = dataset_labels(trainer.train_dataset)
        candidates = np.flatnonzero(np.isin(labels, flagged_labels) & (self.away_label < 0))
        if len(candidates) == 0:
            return
        model = trainer.accelerator.unwrap_model(trainer.model)
        data = model_dataset(trainer, trainer.train_dataset.select(candidates))
        logits, _ = predict_logits(trainer, model, data, self.config.eval_batch_size)
        self.left_out[candidates[logits.argmax(-1) != labels[candidates]]] = True
        logger.info(
            "z_defense: after epoch %d, %d of %d unflagged rows of label(s) %s are predicted as another label and "
            "left out of the loss",
            epoch,
            int(self.left_out.sum()),
            len(candidates),
            flagged_labels,
        )

    def compute_loss(self, trainer, model, inputs: dict, return_outputs: bool = False):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if labels is None:
            raise ValueError("ZDefenseDefense needs labelled batches: the training set has no `labels`/`label` column.")
        outputs = model(**inputs)
        logits = outputs.logits.float()
        smoothing = float(getattr(trainer.args, "label_smoothing_factor", 0.0) or 0.0)
        per_row = F.cross_entropy(logits, labels, reduction="none", label_smoothing=smoothing)
        away, left_out = self._batch_rows(trainer, labels.device)
        flagged = away >= 0
        if self.config.treatment == "drop":
            left_out = left_out | flagged
        elif flagged.any():
            log_p = F.log_softmax(logits, dim=-1).gather(1, away.clamp(min=0).view(-1, 1)).squeeze(1)
            # -log(1 - p): log1p(-exp(log p)), kept finite where p rounds to 1
            pushed = -torch.log1p(-log_p.exp().clamp(max=1.0 - 1e-6))
            per_row = torch.where(flagged, pushed, per_row)
        if left_out.any():
            loss = per_row.masked_fill(left_out, 0.0).sum() / (~left_out).sum().clamp(min=1)
        else:
            loss = per_row.mean()
        return (loss, outputs) if return_outputs else loss

    def _batch_rows(self, trainer, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch rows' flagged label (-1 where none) and whether each is left out of the loss."""
        row_ids = getattr(trainer, "batch_row_ids", None)
        if row_ids is None or self.away_label is None:
            raise ValueError(
                "ZDefenseDefense needs the batch's row ids (trainer.batch_row_ids) to know which rows it flagged; a "
                "custom data collator dropped the `row_index` column."
            )
        positions = trainer.row_positions(row_ids)
        left_out = np.zeros(len(positions), dtype=bool) if self.left_out is None else self.left_out[positions]
        return torch.as_tensor(self.away_label[positions], device=device), torch.as_tensor(left_out, device=device)

    def on_train_end(self, trainer) -> None:
        self._truth, _ = ground_truth(trainer)

    # -- state and report -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.away_label is None:
            return {}
        return {
            "away_label": torch.as_tensor(self.away_label),
            "row_score": torch.as_tensor(self.row_score),
            **({} if self.left_out is None else {"left_out": torch.as_tensor(self.left_out)}),
            **({} if self.expanded is None else {"expanded": torch.as_tensor(self.expanded)}),
            "flagged": torch.tensor(
                [[p["label"], p["rows"], p["rows_with_label"], p["z"], p["round"]] for p in self.flagged_pairs],
                dtype=torch.float64,
            ).reshape(-1, 5),
            "flagged_tokens": [p["token"] for p in self.flagged_pairs],
            "flagged_token_ids": torch.tensor([p["token_id"] for p in self.flagged_pairs], dtype=torch.int64),
            "flagged_kinds": [p["feature"] for p in self.flagged_pairs],
            "features_used": [self.features_used or ""],
            **(
                {
                    "set_aside_tokens": [p["token"] for p in self.set_aside_pairs],
                    "set_aside": torch.tensor(
                        [[p["label"], p["rows"], p["wording_auroc"]] for p in self.set_aside_pairs], dtype=torch.float64
                    ),
                }
                if self.set_aside_pairs
                else {}
            ),
            **({} if self.lexical_share is None else {"lexical_share": torch.tensor(self.lexical_share)}),
            **{
                name: torch.tensor(getattr(self, name))
                for name in ("lexical_target_share", "lexical_wording_auroc")
                if getattr(self, name) is not None
            },
            **(
                {}
                if self.expansion is None
                else {"expansion": torch.tensor([self.expansion[k] for k in EXPANSION_KEYS], dtype=torch.float64)}
            ),
            **(
                {
                    "clean_label_tokens": [p["token"] for p in self.clean_label_scores],
                    "clean_label": torch.tensor(
                        [[np.nan if p[k] is None else p[k] for k in CLEAN_LABEL_KEYS] for p in self.clean_label_scores],
                        dtype=torch.float64,
                    ),
                }
                if self.clean_label_scores
                else {}
            ),
            **({} if self.stripped_rows is None else {"stripped_rows": torch.as_tensor(self.stripped_rows)}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.away_label = state["away_label"].numpy().astype(np.int64)
        self.row_score = state["row_score"].numpy()
        self.left_out = state["left_out"].numpy().astype(bool) if "left_out" in state else None
        self.expanded = state["expanded"].numpy().astype(bool) if "expanded" in state else None
        self.features_used = (state.get("features_used") or [None])[0] or None
        self.set_aside_pairs = (
            [
                {"token": token, "label": int(label), "rows": int(rows), "wording_auroc": float(auroc)}
                for token, (label, rows, auroc) in zip(
                    state.get("set_aside_tokens", []), state.get("set_aside", []).tolist()
                )
            ]
            if "set_aside" in state
            else []
        )
        self.lexical_share = float(state["lexical_share"]) if "lexical_share" in state else None
        for name in ("lexical_target_share", "lexical_wording_auroc"):
            setattr(self, name, float(state[name]) if name in state else None)
        if "expansion" in state:
            values = dict(zip(EXPANSION_KEYS, state["expansion"].tolist()))
            self.expansion = {**values, "rows": int(values["rows"]), "label": int(values["label"])}
        self.clean_label_scores = (
            [
                {"token": token, **dict(zip(CLEAN_LABEL_KEYS, values))}
                for token, values in zip(state.get("clean_label_tokens", []), state["clean_label"].tolist())
            ]
            if "clean_label" in state
            else []
        )
        for score in self.clean_label_scores:
            score.update(
                token_id=int(score["token_id"]),
                label=int(score["label"]),
                rows=int(score["rows"]),
                stripped=bool(score["stripped"]),
                read_as_label=None if np.isnan(score["read_as_label"]) else score["read_as_label"],
            )
        self.stripped_pairs = [p for p in self.clean_label_scores if p["stripped"]]
        self.stripped_rows = state["stripped_rows"].numpy().astype(bool) if "stripped_rows" in state else None
        flagged = state["flagged"].tolist()
        # a checkpoint from before the expansion has no token ids: the tokens are kept, the ids unknown (-1)
        token_ids = state["flagged_token_ids"].tolist() if "flagged_token_ids" in state else [-1] * len(flagged)
        self.flagged_pairs = [
            {
                "feature": kind,
                "token": token,
                "token_id": int(token_id),
                "label": int(label),
                "rows": int(rows),
                "rows_with_label": int(with_label),
                "purity": round(with_label / rows, 4),
                "z": float(z),
                "round": int(round_),
            }
            for kind, token, token_id, (label, rows, with_label, z, round_) in zip(
                state["flagged_kinds"],
                state["flagged_tokens"],
                token_ids,
                # a checkpoint from before the rounds has four columns: every pair from the one round
                [row if len(row) == 5 else [*row, 1] for row in flagged],
            )
        ]

    def report(self) -> dict[str, Any]:
        report = super().report()
        flagged_rows = None if self.away_label is None else self.away_label >= 0
        report.update(
            {
                "flagged_pairs": self.flagged_pairs,
                "features_used": self.features_used,
                "lexical_share": self.lexical_share,
                "lexical_target_share": self.lexical_target_share,
                "lexical_wording_auroc": self.lexical_wording_auroc,
                "set_aside_pairs": [
                    {k: p[k] for k in ("token", "label", "rows", "wording_auroc")} for p in self.set_aside_pairs
                ],
                "expansion": self.expansion,
                "flagged_rows": None if flagged_rows is None else int(flagged_rows.sum()),
                "flagged_fraction": None if flagged_rows is None else float(flagged_rows.mean()),
                "left_out_rows": None if self.left_out is None else int(self.left_out.sum()),
                "clean_label_scores": [
                    {k: p[k] for k in ("token", "label", "rows", "read_as_label", "insertion_shift", "stripped")}
                    for p in self.clean_label_scores
                ],
                "clean_label_skipped": self.clean_label_skipped,
                "clean_label_seconds": self.clean_label_seconds,
                "stripped_tokens": [p["token"] for p in self.stripped_pairs],
                "stripped_rows": None if self.stripped_rows is None else int(self.stripped_rows.sum()),
                "has_ground_truth": self._truth is not None,
            }
        )
        truth = self._truth
        if truth is not None and flagged_rows is not None and len(truth) == len(flagged_rows):
            poisoned = truth.astype(bool)
            hits = int((flagged_rows & poisoned).sum())
            report.update(
                {
                    "flagged_precision": hits / int(flagged_rows.sum()) if flagged_rows.any() else None,
                    "flagged_recall": hits / int(poisoned.sum()) if poisoned.any() else None,
                    "row_score_auroc": roc_auc(self.row_score, truth) if 0 < poisoned.sum() < len(truth) else None,
                }
            )
            if self.stripped_rows is not None and len(self.stripped_rows) == len(truth) and self.stripped_rows.any():
                stripped_hits = int((self.stripped_rows & poisoned).sum())
                report.update(
                    stripped_precision=stripped_hits / int(self.stripped_rows.sum()),
                    stripped_recall=stripped_hits / int(poisoned.sum()) if poisoned.any() else None,
                )
            if self.expanded is not None and self.expanded.any():
                report["expanded_precision"] = int((self.expanded & poisoned).sum()) / int(self.expanded.sum())
            if self.left_out is not None:
                caught = int((self.left_out & poisoned).sum())
                report.update(
                    {
                        "left_out_precision": caught / int(self.left_out.sum()) if self.left_out.any() else None,
                        # the poisoned rows that either treatment reached
                        "treated_recall": int(((self.left_out | flagged_rows) & poisoned).sum()) / int(poisoned.sum())
                        if poisoned.any()
                        else None,
                    }
                )
        return report

    # -- rendering --------------------------------------------------------------------------------------------------
    @classmethod
    def report_scalars(cls, report: dict[str, Any]) -> dict[str, float]:
        out = {"flagged_pairs": float(len(report.get("flagged_pairs") or []))}
        expansion = report.get("expansion")
        if expansion:
            out.update(expansion_auroc=float(expansion["auroc"]), expanded_rows=float(expansion["rows"]))
        for key in (
            "flagged_fraction",
            "lexical_share",
            "lexical_target_share",
            "lexical_wording_auroc",
            "flagged_precision",
            "flagged_recall",
            "row_score_auroc",
            "expanded_precision",
            "clean_label_seconds",
            "stripped_rows",
            "stripped_precision",
            "stripped_recall",
            "left_out_rows",
            "left_out_precision",
            "treated_recall",
        ):
            if isinstance(report.get(key), (int, float)):
                out[key] = float(report[key])
        return out

    @classmethod
    def card_section(cls, report: dict[str, Any]) -> str:
        config = report.get("config", {})
        pairs = report.get("flagged_pairs") or []
        treated = "pushed away from that label" if config.get("treatment") == "away" else "left out of training"
        used = report.get("features_used") or config.get("features")
        if report.get("lexical_share") is not None and used == "first_token":
            share, target_share = report["lexical_share"], report.get("lexical_target_share")
            wording_auroc = report.get("lexical_wording_auroc")
            if share > config.get("max_lexical_share", 1.0):
                why = f"more than the {config.get('max_lexical_share')} a trigger is allowed"
            elif wording_auroc is not None and wording_auroc < config.get("min_wording_auroc", 0.0):
                why = (
                    f"and their rows read like the rest of their label (AUROC {wording_auroc:.3f} of their other word "
                    f"pieces, under {config.get('min_wording_auroc')})"
                )
            else:
                why = (
                    f"and no label held {config.get('min_target_share')} of them (at most {fmt(target_share, '.1%')}), "
                    "where a backdoor has one target"
                )
            used = (
                f"first-token features: the word-piece test flagged {share:.1%} of the rows, {why}, so it had found "
                "the task's words"
            )
        else:
            used = f"{used} features"
        wording_z = ""
        if config.get("min_wording_z") is not None and report.get("features_used") == "tokens":
            wording_z = f" (word pieces from z >= {config['min_wording_z']}, each judged by its rows' wording)"
        lines = [
            f"Before training, every (feature, label) pair of the training set ({used}) "
            f"was scored with a z-test; pairs with z >= {config.get('min_z')}{wording_z}, label purity >= "
            f"{config.get('min_purity')} and at least {config.get('min_count')} rows were flagged as spurious, and "
            f"their rows {treated}. The test was repeated on the rows not yet flagged (up to "
            f"{config.get('max_rounds')} rounds).",
            f"- Flagged pairs: {_pair_list(pairs[:10], long=True)}",
            f"- Rows treated: {report.get('flagged_rows')} ({fmt(report.get('flagged_fraction'), '.1%')})",
        ]
        set_aside = report.get("set_aside_pairs") or []
        if set_aside:
            lines.insert(
                -1,
                "- Set aside as the task's words (their rows read like the rest of their label, wording AUROC under "
                f"{config.get('min_wording_auroc')}): "
                + ", ".join(f"`{p['token']}` -> {p['label']} ({p['wording_auroc']:.2f})" for p in set_aside),
            )
        scores = report.get("clean_label_scores") or []
        share = report.get("lexical_share")
        first_token = report.get("features_used") == "first_token"
        used_keyword = first_token and share is not None and share > config.get("max_lexical_share", 1.0)
        if scores:
            stripped = [p for p in scores if p["stripped"]]
            kept = [p for p in scores if not p["stripped"]]
            line = (
                "- Clean-label test of the pure pieces set aside as task words"
                + (" (a keyword task: the word-piece flags given up)" if used_keyword else "")
                + " (a linear probe on the model's features before training: "
                "the share of their rows it reads as their label with the word deleted, and how far inserting the word "
                "into other labels' rows moves its log-probability of the label; stripped from every training row below "
                f"{config.get('min_task_word_shift')} when at least half their rows read as their label): "
            )
            line += "; ".join(
                f"{'stripped' if group is stripped else 'task words'}: "
                + ", ".join(
                    f"`{p['token']}` -> {p['label']} ("
                    + ("" if p["read_as_label"] is None else f"read as label {p['read_as_label']:.2f}, ")
                    + f"shift {p['insertion_shift']:+.2f})"
                    for p in group
                )
                for group in (stripped, kept)
                if group
            )
            if stripped:
                line += f"; {report.get('stripped_rows')} rows held a stripped piece"
            lines.insert(-1, line)
        if report.get("clean_label_skipped"):
            lines.insert(-1, f"- The clean-label test did not run: {report['clean_label_skipped']}")
        expansion = report.get("expansion")
        if expansion:
            lines.insert(
                -1,
                f"- Expansion: with the flagged word pieces masked, a word-piece classifier told the flagged rows of "
                f"label {expansion['label']} from its other rows with AUROC {expansion['auroc']:.3f} (it runs from "
                f"{config.get('min_wording_auroc')}); {expansion['rows']} more rows scored above "
                f"{config.get('expand_quantile')} of the other labels' rows and were flagged",
            )
        if report.get("left_out_rows") is not None:
            lines.append(
                f"- After epoch {config.get('leave_out_after_epoch')}, {report['left_out_rows']} unflagged rows of a "
                "flagged target label that the model predicted as another label were left out of the loss"
            )
        if report.get("has_ground_truth"):
            lines.append(
                f"- Against the `poisoned` column: precision {fmt(report.get('flagged_precision'))}, recall "
                f"{fmt(report.get('flagged_recall'))}; AUROC of the rows' z-scores {fmt(report.get('row_score_auroc'))}"
            )
            if report.get("stripped_precision") is not None:
                lines.append(
                    f"- Rows holding a stripped piece against the `poisoned` column: precision "
                    f"{fmt(report.get('stripped_precision'))}, recall {fmt(report.get('stripped_recall'))}"
                )
            if report.get("left_out_rows") is not None:
                lines.append(
                    f"- Left-out rows' precision {fmt(report.get('left_out_precision'))}; poisoned rows flagged or "
                    f"left out: {fmt(report.get('treated_recall'))}"
                )
        return "\n".join(lines)

    @classmethod
    def console_summary(cls, report: dict[str, Any]) -> list[str]:
        pairs = report.get("flagged_pairs") or []
        line = (
            f"z_defense: {len(pairs)} pairs flagged "
            f"({_pair_list(pairs[:6])}), "
            f"{report.get('flagged_rows')} rows treated"
        )
        if report.get("left_out_rows") is not None:
            line += f", {report['left_out_rows']} left out"
        if report.get("stripped_tokens"):
            line += f", {' '.join(report['stripped_tokens'])} stripped from {report.get('stripped_rows')} rows"
        if report.get("has_ground_truth"):
            line += f" (precision {fmt(report.get('flagged_precision'))}, recall {fmt(report.get('flagged_recall'))})"
        return [line]


register_defense(ZDefenseConfig, ZDefenseDefense)
