"""Z-defense: rows whose label a single surface feature predicts too well are pushed away from that label.

He et al., "Mitigating Backdoor Poisoning Attacks through the Lens of Spurious Correlation", EMNLP 2023 (official
code xlhex/emnlp2023_z-defence). A dirty-label backdoor makes a feature of the text (a rare word, an inserted
sentence, a syntactic template) predict the target label far better than any feature of the task does. The paper
scores every (feature, label) pair with a one-proportion z-test, ``z = (p(label | feature) - p(label)) / sqrt(p(label)
(1 - p(label)) / count(feature))``, and removes the training rows that hold an outlying pair before training; its
features are unigrams (lexical triggers) and the top levels of a constituency parse (syntactic triggers).

What this module does, and where it departs from the paper:

- **Features.** ``features="first_token"`` (the default) uses the row's first word piece: the one place where a
  syntactic template's shape shows without a parser. HiddenKiller's template ``S(SBAR)(,)(NP)(VP)(.)`` opens with a
  subordinating conjunction, and on the packaged releases 72-85% of the poisoned rows start with ``if``, ``when`` or
  ``as``. No parser is needed (none can be installed offline here). ``"tokens"`` adds the paper's unigram features
  (every word piece of the row) for a defense used without BTU.
- **Which pairs are flagged.** The paper takes pairs beyond a multiple of the z-scores' standard deviation, which on
  a 2,000-row slice separates nothing (z grows with the square root of the feature's count). Here a pair is flagged
  when it is significant (``z >= min_z``), nearly pure (``p(label | feature) >= min_purity``: a backdoor's rows all
  carry the target label) and frequent enough to matter (``count >= min_count``). The thresholds are a conventional
  significance level and a purity a task feature rarely reaches, chosen on the SST-2 and HSOL slices' feature counts
  before any model was trained (README, "Paraphrase triggers").
- **What happens to the flagged rows.** The paper drops them. Dropping the 75% of poisoned rows that the first-token
  features find (``treatment="drop"``: their loss masked) left much of SST-2's syntactic backdoor in place (ASR
  0.505, floor 0.286): the rest of the poisoned rows still teach it. With ``treatment="away"`` (the default) the
  flagged rows stay in training with the loss ``-log(1 - p(label))``: the model is taught that the template does
  *not* mean the label, which also unlearns what the unflagged poisoned rows teach (ASR 0.181 on the same run;
  README, "Paraphrase triggers").
- The statistics are computed once, at ``on_train_begin``, from the tokenized training set: no clean data, no extra
  forward pass; the loss is one cross-entropy per row.

Where it cannot work:

- Clean-label poisoning (the poisoned rows keep their true label): the trigger's label purity is that of the task.
- Triggers with no feature the z-test sees: a template that does not open the sentence, a style (StyleBkd) spread
  over the whole text, or a trigger feature shared with many clean rows (purity below ``min_purity``).
- Tasks where one word decides the label (HSOL's offensive words): with ``features="tokens"`` those words are flagged
  as spurious and their rows pushed away from their true label. Keep the default first-token features and stack it
  after ``BTUConfig()``, which finds token triggers from the model.
- A task feature that really is that pure at the sentence start is treated as a trigger; the report lists every
  flagged pair with its counts, so it can be checked.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

from ..metrics import roc_auc
from ..registry import register_defense
from ._shared.row_signals import fmt, ground_truth
from .base import Defense, DefenseConfig

logger = logging.getLogger(__name__)

FEATURES = ("first_token", "tokens")
TREATMENTS = ("away", "drop")


@dataclass
class ZDefenseConfig(DefenseConfig):
    """Find (feature, label) pairs with an outlying z-score in the training set; push their rows away from the label."""

    features: str = field(
        default="first_token",
        metadata={
            "help": "which features are tested: 'first_token' (the row's first word piece: where a syntactic "
            "template opens) or 'tokens' (every word piece of the row as well, the paper's unigrams; flags the "
            "decisive words of keyword tasks such as HSOL)."
        },
    )
    min_z: float = field(
        default=4.0,
        metadata={"help": "a (feature, label) pair is flagged only with a one-proportion z-score of at least this."},
    )
    min_purity: float = field(
        default=0.95,
        metadata={"help": "... and only if at least this share of the feature's rows carry the label, in (0, 1]."},
    )
    min_count: int = field(
        default=10,
        metadata={"help": "... and only if the feature is in at least this many training rows."},
    )
    treatment: str = field(
        default="away",
        metadata={
            "help": "what the flagged rows are trained on: 'away' (the loss -log(1 - p(label)): the feature is "
            "taught not to mean the label) or 'drop' (left out of the loss, the paper's removal)."
        },
    )
    name = "z_defense"

    def __post_init__(self) -> None:
        self._check_choice("features", FEATURES)
        self._check_choice("treatment", TREATMENTS)
        self._check_interval("(0, 1]", "min_purity")
        self._check_at_least(1, "min_count")


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
    if kind == "tokens":
        out += [("token", i) for i in dict.fromkeys(pieces)]
    return out


def _pair_list(pairs: list[dict[str, Any]], long: bool = False) -> str:
    if not pairs:
        return "none"
    if long:
        return ", ".join(f"`{p['token']}` -> {p['label']} ({p['rows']} rows, z {p['z']:.1f})" for p in pairs)
    return " ".join(f"{p['token']}->{p['label']}" for p in pairs)


class ZDefenseDefense(Defense):
    config: ZDefenseConfig
    owns_loss = True
    needs_row_ids = True  # flagged rows are known by row id
    limitations = (
        "The z-test sees only the features it was given: a trigger spread over the text (a style) or shared with many "
        "clean rows is not flagged, and clean-label poisoning gives the trigger no label purity to find.",
    )

    def __init__(self, config: ZDefenseConfig):
        super().__init__(config)
        self.flagged_pairs: list[dict[str, Any]] = []
        self.away_label: np.ndarray | None = None  # per dataset position: the flagged label, or -1
        self.row_score: np.ndarray | None = None  # per position: the highest z of the row's (feature, own label)
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
        self.flag(rows, labels, num_labels, tokenizer)

    def flag(self, rows: list[list[tuple[str, int]]], labels: np.ndarray, num_labels: int, tokenizer=None) -> None:
        """Run the z-test on the rows' features (:func:`row_features`) and set the flagged pairs and rows."""
        cfg = self.config
        prior = np.bincount(labels, minlength=num_labels) / len(labels)
        index: dict[tuple[str, int], int] = {}
        for features in rows:
            for feature in features:
                index.setdefault(feature, len(index))
        counts = np.zeros((len(index), num_labels))
        for features, label in zip(rows, labels):
            for feature in features:
                counts[index[feature], label] += 1
        totals = counts.sum(1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = z_scores(totals, counts, prior[None, :])
        z = np.nan_to_num(z, nan=0.0, posinf=0.0, neginf=0.0)  # a label no row carries has no z-score
        purity = counts / totals
        flagged = (z >= cfg.min_z) & (purity >= cfg.min_purity) & (totals >= cfg.min_count)
        features = list(index)
        self.flagged_pairs = []
        for f, label in zip(*np.nonzero(flagged)):
            kind, token_id = features[f]
            token = tokenizer.convert_ids_to_tokens(int(token_id)) if tokenizer is not None else str(token_id)
            self.flagged_pairs.append(
                {
                    "feature": kind,
                    "token": token,
                    "label": int(label),
                    "rows": int(totals[f, 0]),
                    "rows_with_label": int(counts[f, label]),
                    "purity": round(float(purity[f, label]), 4),
                    "z": round(float(z[f, label]), 3),
                }
            )
        self.flagged_pairs.sort(key=lambda p: -p["z"])
        self.away_label = np.full(len(rows), -1, dtype=np.int64)
        self.row_score = np.full(len(rows), -np.inf)
        for position, (row, label) in enumerate(zip(rows, labels)):
            ids = [index[feature] for feature in row]
            if ids:
                self.row_score[position] = float(z[ids, label].max())
                if flagged[ids, label].any():
                    self.away_label[position] = label
        logger.info(
            "z_defense: %d (feature, label) pairs flagged, %d of %d rows pushed away from their label (%s)",
            len(self.flagged_pairs),
            int((self.away_label >= 0).sum()),
            len(rows),
            _pair_list(self.flagged_pairs[:10]),
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
        away = self._batch_away_labels(trainer, labels.device)
        flagged = away >= 0
        if flagged.any():
            if self.config.treatment == "drop":
                per_row = per_row.masked_fill(flagged, 0.0)
                loss = per_row.sum() / (~flagged).sum().clamp(min=1)
                return (loss, outputs) if return_outputs else loss
            log_p = F.log_softmax(logits, dim=-1).gather(1, away.clamp(min=0).view(-1, 1)).squeeze(1)
            # -log(1 - p): log1p(-exp(log p)), kept finite where p rounds to 1
            pushed = -torch.log1p(-log_p.exp().clamp(max=1.0 - 1e-6))
            per_row = torch.where(flagged, pushed, per_row)
        loss = per_row.mean()
        return (loss, outputs) if return_outputs else loss

    def _batch_away_labels(self, trainer, device) -> torch.Tensor:
        row_ids = getattr(trainer, "batch_row_ids", None)
        if row_ids is None or self.away_label is None:
            raise ValueError(
                "ZDefenseDefense needs the batch's row ids (trainer.batch_row_ids) to know which rows it flagged; a "
                "custom data collator dropped the `row_index` column."
            )
        positions = trainer.row_positions(row_ids)
        return torch.as_tensor(self.away_label[positions], device=device)

    def on_train_end(self, trainer) -> None:
        self._truth, _ = ground_truth(trainer)

    # -- state and report -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.away_label is None:
            return {}
        return {
            "away_label": torch.as_tensor(self.away_label),
            "row_score": torch.as_tensor(self.row_score),
            "flagged": torch.tensor(
                [[p["label"], p["rows"], p["rows_with_label"], p["z"]] for p in self.flagged_pairs], dtype=torch.float64
            ).reshape(-1, 4),
            "flagged_tokens": [p["token"] for p in self.flagged_pairs],
            "flagged_kinds": [p["feature"] for p in self.flagged_pairs],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.away_label = state["away_label"].numpy().astype(np.int64)
        self.row_score = state["row_score"].numpy()
        self.flagged_pairs = [
            {
                "feature": kind,
                "token": token,
                "label": int(label),
                "rows": int(rows),
                "rows_with_label": int(with_label),
                "purity": round(with_label / rows, 4),
                "z": float(z),
            }
            for kind, token, (label, rows, with_label, z) in zip(
                state["flagged_kinds"], state["flagged_tokens"], state["flagged"].tolist()
            )
        ]

    def report(self) -> dict[str, Any]:
        report = super().report()
        flagged_rows = None if self.away_label is None else self.away_label >= 0
        report.update(
            {
                "flagged_pairs": self.flagged_pairs,
                "flagged_rows": None if flagged_rows is None else int(flagged_rows.sum()),
                "flagged_fraction": None if flagged_rows is None else float(flagged_rows.mean()),
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
        return report

    # -- rendering --------------------------------------------------------------------------------------------------
    @classmethod
    def report_scalars(cls, report: dict[str, Any]) -> dict[str, float]:
        out = {"flagged_pairs": float(len(report.get("flagged_pairs") or []))}
        for key in ("flagged_fraction", "flagged_precision", "flagged_recall", "row_score_auroc"):
            if isinstance(report.get(key), (int, float)):
                out[key] = float(report[key])
        return out

    @classmethod
    def card_section(cls, report: dict[str, Any]) -> str:
        config = report.get("config", {})
        pairs = report.get("flagged_pairs") or []
        treated = "pushed away from that label" if config.get("treatment") == "away" else "left out of training"
        lines = [
            f"Before training, every (feature, label) pair of the training set ({config.get('features')} features) "
            f"was scored with a z-test; pairs with z >= {config.get('min_z')}, label purity >= "
            f"{config.get('min_purity')} and at least {config.get('min_count')} rows were flagged as spurious, and "
            f"their rows {treated}.",
            f"- Flagged pairs: {_pair_list(pairs[:10], long=True)}",
            f"- Rows treated: {report.get('flagged_rows')} ({fmt(report.get('flagged_fraction'), '.1%')})",
        ]
        if report.get("has_ground_truth"):
            lines.append(
                f"- Against the `poisoned` column: precision {fmt(report.get('flagged_precision'))}, recall "
                f"{fmt(report.get('flagged_recall'))}; AUROC of the rows' z-scores {fmt(report.get('row_score_auroc'))}"
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
        if report.get("has_ground_truth"):
            line += f" (precision {fmt(report.get('flagged_precision'))}, recall {fmt(report.get('flagged_recall'))})"
        return [line]


register_defense(ZDefenseConfig, ZDefenseDefense)
