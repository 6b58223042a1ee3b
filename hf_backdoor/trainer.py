"""``BackdoorSafeTrainer``: a drop-in ``transformers.Trainer`` that runs a backdoor defense while it fine-tunes.

The trainer only calls the defense's hooks (see ``defenses/base.py``); the method logic lives in the defense.
With ``defense=None`` it is exactly a ``Trainer``.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .arguments import BackdoorSafeTrainingArguments
from .defenses import DefenseConfig, build_defense
from .metrics import evaluate_backdoor

DEFENSE_STATE_NAME = "defense_state.pt"


class _DefenseCallback(TrainerCallback):
    """Forwards the Trainer's events to the defense (callbacks get no trainer handle, so this one keeps it)."""

    def __init__(self, trainer: BackdoorSafeTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer.defense.on_train_begin(self.trainer)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.trainer.defense.on_epoch_end(self.trainer)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.defense.on_train_end(self.trainer)
        self.trainer._write_defense_report()


class BackdoorSafeTrainer(Trainer):
    """``transformers.Trainer`` with a backdoor defense.

    Args:
        defense: a defense config (e.g. ``BTUConfig()``), a ``{"name": ..., **fields}`` dict, or ``None``. When
            ``None`` and ``args`` is a ``BackdoorSafeTrainingArguments`` naming a defense, that one is used.
        Everything else is ``Trainer``'s.

    After ``train()``, ``defense_report`` holds what the defense found and did; it is written as JSON into
    ``output_dir`` and its scalars are logged through the Trainer's loggers.
    """

    def __init__(self, *args, defense: DefenseConfig | dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if defense is None and isinstance(self.args, BackdoorSafeTrainingArguments):
            defense = self.args.defense_config()
        self.defense = build_defense(defense)
        self.defense_report: dict[str, Any] | None = None
        self.backdoor_evaluations: list[dict[str, Any]] = []  # what the model card and the report show
        if self.defense is not None:
            self.add_callback(_DefenseCallback(self))

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if self.defense is not None and resume_from_checkpoint:
            checkpoint = resume_from_checkpoint
            if checkpoint is True:
                checkpoint = get_last_checkpoint(self.args.output_dir)
            state_path = os.path.join(str(checkpoint), DEFENSE_STATE_NAME)
            if not os.path.exists(state_path):
                raise FileNotFoundError(
                    f"{checkpoint} has no {DEFENSE_STATE_NAME}: it was not written by a BackdoorSafeTrainer with "
                    "this defense, and resuming would silently redo or lose the defense's detection."
                )
            self.defense.load_state_dict(torch.load(state_path, weights_only=True))
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.defense is not None:
            inputs = self.defense.prepare_inputs(self, inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.defense is not None and model.training:
            loss = self.defense.compute_loss(self, model, inputs, return_outputs)
            if loss is not None:
                return loss
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.defense is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            torch.save(self.defense.state_dict(), os.path.join(folder, DEFENSE_STATE_NAME))

    def _write_defense_report(self) -> None:
        self.defense_report = self.defense.report()
        scalars = {f"{self.defense.config.name}/{k}": v for k, v in _flat_scalars(self.defense_report).items()}
        if scalars:
            self.log(scalars)
        if self.is_world_process_zero():
            name = getattr(self.args, "defense_report_name", "defense_report.json")
            os.makedirs(self.args.output_dir, exist_ok=True)
            with open(os.path.join(self.args.output_dir, name), "w") as f:
                json.dump(self.defense_report, f, indent=1)

    def expose(self, clean_dataset, config=None):
        """An exposed copy of the trained model (EBYD: Clean Unlearning by default); the model is left untouched.

        See ``hf_backdoor/defenses/exposure.py``.
        """
        from .defenses.exposure import expose_model

        return expose_model(self, clean_dataset, config)

    def sanitize(self, clean_dataset, defense, exposed=None):
        """Post-training backdoor removal with a small clean set (``RNPConfig``, ``NADConfig``, ``NWCConfig``):
        returns the repaired model and its report. ``exposed`` (RNP and NWC only): the result of
        :meth:`expose`, used in place of the defense's own clean unlearning (EBYD). See
        ``hf_backdoor/defenses/sanitize.py``."""
        from .defenses.sanitize import sanitize_model

        return sanitize_model(self, clean_dataset, defense, exposed=exposed)

    def evaluate_backdoor(
        self,
        clean_dataset,
        poisoned_dataset=None,
        target_label: int | None = None,
        asr_floor: float | None = None,
        attack: str | None = None,
        dataset_name: str | None = None,
    ) -> dict[str, Any]:
        """CACC on ``clean_dataset`` and ASR on ``poisoned_dataset`` (an ASR set from ``make_asr_dataset``).

        The result is also recorded (with ``attack`` and ``dataset_name``) for the model card and the report.
        """
        result = evaluate_backdoor(self, clean_dataset, poisoned_dataset, target_label, asr_floor).to_dict()
        self.add_backdoor_evaluation(model="this model", attack=attack, dataset=dataset_name, **result)
        return result

    def add_backdoor_evaluation(self, model: str, cacc: float, asr: float | None = None, **fields) -> None:
        """Record an evaluation measured elsewhere for the card, e.g. the undefended model's
        (``model="undefended"``) so that the card shows CACC and ASR before and after the defense."""
        self.backdoor_evaluations.append({"model": model, "cacc": float(cacc), "asr": asr, **fields})

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model``, plus (when called by the user) the defense report, the backdoor evaluations, a
        run report with figures and the model card."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if not _internal_call and self.args.should_save:
            self._write_card_and_report(output_dir or self.args.output_dir)

    def create_model_card(self, **kwargs) -> None:
        """The backdoor-aware card (``hf_backdoor.cards``) instead of ``Trainer``'s draft; ``push_to_hub`` calls
        this, so a pushed repository carries the card, the defense report and the figures."""
        if not self.is_world_process_zero():
            return
        self._write_card_and_report(self.args.output_dir, **kwargs)

    def push_to_hub(self, *args, **kwargs):
        """``Trainer.push_to_hub`` (the user's token, ``hub_model_id``, ``hub_private_repo``), with the card, the defense
        report and the figures in the pushed folder. Offline, a clear error instead of a connection traceback."""
        from huggingface_hub import constants
        from huggingface_hub.errors import OfflineModeIsEnabled

        advice = (
            "Save locally with `trainer.save_model(output_dir)` (weights, tokenizer, card, defense report) and push "
            "that folder later with `hf upload <repo_id> <output_dir>` from a machine with network access."
        )
        if constants.is_offline_mode():
            raise ConnectionError(f"Cannot push to the Hub: offline mode is on (HF_HUB_OFFLINE=1). {advice}")
        try:
            return super().push_to_hub(*args, **kwargs)
        except Exception as error:
            # requests and httpx name their network errors differently; match on the class names they share.
            network = isinstance(error, (OfflineModeIsEnabled, ConnectionError)) or any(
                "Connect" in cls.__name__ or "Timeout" in cls.__name__ for cls in type(error).__mro__
            )
            if not network:
                raise
            raise ConnectionError(f"Cannot reach the Hub to push: {error}. {advice}") from error

    def _write_card_and_report(self, output_dir: str, **card_kwargs) -> None:
        from .cards import build_model_card
        from .reports import write_report

        os.makedirs(output_dir, exist_ok=True)
        if self.defense_report is not None:
            with open(os.path.join(output_dir, "defense_report.json"), "w") as f:
                json.dump(self.defense_report, f, indent=1)
        with open(os.path.join(output_dir, "backdoor_evaluations.json"), "w") as f:
            json.dump(self.backdoor_evaluations, f, indent=1)
        figures = write_report(output_dir, self.defense_report, self.backdoor_evaluations)
        dataset = card_kwargs.get("dataset")
        card = build_model_card(
            self,
            model_name=card_kwargs.get("model_name"),
            finetuned_from=card_kwargs.get("finetuned_from"),
            dataset=dataset[0] if isinstance(dataset, list) else dataset,
            language=card_kwargs.get("language"),
            license=card_kwargs.get("license"),
            tags=[card_kwargs["tags"]] if isinstance(card_kwargs.get("tags"), str) else card_kwargs.get("tags"),
            figures=figures,
            repo_hint=self.args.hub_model_id,
        )
        card.save(os.path.join(output_dir, "README.md"))


def _flat_scalars(report: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in report.items():
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)):
            out[prefix + key] = float(value)
        elif isinstance(value, dict) and key == "timings_s":
            out.update(_flat_scalars(value, prefix=f"{key}/"))
        elif isinstance(value, list) and key == "flagged_ids":
            out[prefix + "num_flagged"] = float(len(value))
    return out
