"""``BackdoorSafeTrainer``: a drop-in ``transformers.Trainer`` that runs a backdoor defense while it fine-tunes.

The trainer only calls the defense's hooks (see ``defenses/base.py``); the method logic lives in the defense.
With ``defense=None`` it is exactly a ``Trainer``.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .arguments import BackdoorSafeTrainingArguments
from .defenses.base import Defense, build_defenses, reports_from_json
from .hub.run_folder import TRAINER_RUN_NAME, write_json_atomic
from .metrics import evaluate_backdoor

logger = logging.getLogger(__name__)

DEFENSE_STATE_NAME = "defense_state.pt"
RUN_INFO_NAME = TRAINER_RUN_NAME
ROW_INDEX = "row_index"


class _DefenseCallback(TrainerCallback):
    """Forwards the Trainer's events to each defense of the stack, in order (callbacks get no trainer handle, so
    this one keeps it), and saves the defenses' state into every checkpoint the Trainer writes."""

    def __init__(self, trainer: BackdoorSafeTrainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._index_train_rows()
        for defense in self.trainer.defenses:
            defense.on_train_begin(self.trainer)

    def on_epoch_end(self, args, state, control, **kwargs):
        for defense in self.trainer.defenses:
            defense.on_epoch_end(self.trainer)

    def on_train_end(self, args, state, control, **kwargs):
        for defense in self.trainer.defenses:
            defense.on_train_end(self.trainer)
        self.trainer._write_defense_report()

    def on_save(self, args, state, control, **kwargs):
        if args.should_save:
            folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            if os.path.isdir(folder):
                torch.save(self.trainer._defense_states(), os.path.join(folder, DEFENSE_STATE_NAME))


class BackdoorSafeTrainer(Trainer):
    """``transformers.Trainer`` with backdoor defenses.

    Args:
        defense: a defense config (e.g. ``BTUConfig()``), a registered name, a ``{"name": ..., **fields}`` dict, a
            list of those (a stack, run in list order), or ``None``. When ``None`` and ``args`` is a
            ``BackdoorSafeTrainingArguments`` naming defenses, those are used.
        Everything else is ``Trainer``'s.

    After ``train()``, ``defense_reports`` holds what each defense found and did (``defense_report`` is the single
    defense's report, or ``{"defense": "stack", "defenses": [...]}``); it is written as JSON into ``output_dir`` and
    each defense's scalars are logged through the Trainer's loggers under ``<name>/``.
    With no defense it is exactly a ``Trainer``.
    """

    def __init__(self, *args, defense: Any = None, **kwargs):
        super().__init__(*args, **kwargs)
        if defense is None and isinstance(self.args, BackdoorSafeTrainingArguments):
            defense = self.args.defense_config()
        self.defenses: list[Defense] = build_defenses(defense, stage="training")
        if _averages_each_micro_batch(self.accelerator.unwrap_model(self.model)):
            # transformers' classification heads take **kwargs but average each micro-batch themselves (they ignore
            # num_items_in_batch), so Trainer's "the model scales the loss" guess would skip the division by the
            # accumulation steps and make every accumulated update that many times too large. Saying the model takes
            # no loss kwargs makes Trainer divide; with one accumulation step nothing changes.
            self.model_accepts_loss_kwargs = False
        self._check_distributed()
        self._warn_if_bf16_is_slow_here()
        for defense_ in self.defenses:
            defense_.check_trainer(self)
        self.defense_reports: list[dict[str, Any]] = []
        # Written into every artefact of this run, so a report left by an earlier run is never taken for this one's.
        self.run_id = uuid.uuid4().hex
        self.backdoor_evaluations: list[dict[str, Any]] = []  # what the model card and the report show
        self.train_row_ids: np.ndarray | None = None
        self.batch_row_ids: torch.Tensor | None = None
        self._row_positions: dict[int, int] = {}
        if self.defenses:
            self.add_callback(_DefenseCallback(self))

    # -- the stack ------------------------------------------------------------------------------------------------
    @property
    def defense(self) -> Defense | None:
        """The defense when exactly one runs (``None`` otherwise; a stack is in ``defenses``)."""
        return self.defenses[0] if len(self.defenses) == 1 else None

    @property
    def defense_report(self) -> dict[str, Any] | None:
        if not self.defense_reports:
            return None
        if len(self.defense_reports) == 1:
            return self.defense_reports[0]
        return {"defense": "stack", "defenses": self.defense_reports}

    @defense_report.setter
    def defense_report(self, report: dict[str, Any] | None) -> None:
        self.defense_reports = reports_from_json(report)

    def _warn_if_bf16_is_slow_here(self) -> None:
        if self.args.bf16 and self.args.device.type == "cpu" and not cpu_has_bf16_instructions():
            # Measured on a 2-core AMD EPYC with AVX2 only: a MiniLM or ViT training step 24x slower under bf16
            # autocast than in fp32 (benchmarks/results/speed_levers.json); with AVX512-BF16 it was 1.6-2x faster.
            logger.warning(
                "bf16=True on a CPU without bf16 instructions (avx512_bf16 / amx_bf16): bfloat16 is emulated here "
                "and training runs many times slower than in float32. Drop bf16, or measure both with "
                "benchmarks/speed_levers.py."
            )

    def _check_distributed(self) -> None:
        if not self.defenses:
            return
        if getattr(self, "is_fsdp_enabled", False) or getattr(self, "is_deepspeed_enabled", False):
            unsupported = [d.name for d in self.defenses if not getattr(d, "supports_sharded_parameters", False)]
            if unsupported:
                engine = "FSDP" if getattr(self, "is_fsdp_enabled", False) else "DeepSpeed"
                raise ValueError(
                    f"{unsupported} read or rewrite whole parameter tensors (e.g. the word-embedding matrix), which "
                    f"{engine} shards across processes. Supported: one process, or data parallelism (DDP, "
                    "`accelerate launch --multi_gpu` / `--num_processes N` without FSDP or DeepSpeed)."
                )

    # -- row identity ---------------------------------------------------------------------------------------------
    def _needs_row_ids(self) -> bool:
        return any(d.needs_row_ids for d in self.defenses)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._needs_row_ids() and ROW_INDEX not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, ROW_INDEX]

    def _index_train_rows(self) -> None:
        """``train_row_ids`` from the training set's ``row_index`` column (added here, as positions, when missing)."""
        if not self._needs_row_ids():
            return
        dataset = self.train_dataset
        columns = getattr(dataset, "column_names", None)
        if columns is None:
            raise ValueError(
                f"{[d.name for d in self.defenses if d.needs_row_ids]} must recognise every training row across "
                f"epochs: pass a `datasets.Dataset` as train_dataset (got {type(dataset).__name__})."
            )
        if ROW_INDEX not in columns:
            if dataset.format.get("type") == "custom":
                raise ValueError(
                    f"The training set has a transform but no {ROW_INDEX!r} column, so its rows cannot be told "
                    "apart across epochs. Build it with the column: for images "
                    "`prepare_image_dataset(train, processor, train=True, keep_row_index=True)`."
                )
            self.train_dataset = dataset = dataset.add_column(ROW_INDEX, list(range(len(dataset))))
        ids = np.asarray(dataset.with_format(None)[ROW_INDEX], dtype=np.int64)
        if len(np.unique(ids)) != len(ids):
            raise ValueError(
                f"The training set's {ROW_INDEX!r} column has repeated values; each row needs its own id (drop the "
                f"column and the trainer numbers the rows, or rebuild it with `dataset.add_column`)."
            )
        self.train_row_ids = ids
        self._row_positions = {int(i): p for p, i in enumerate(ids)}

    def row_positions(self, row_ids) -> list[int]:
        """Positions in ``train_dataset`` of the given row ids (``trainer.batch_row_ids`` for the current batch)."""
        values = row_ids.tolist() if torch.is_tensor(row_ids) else list(row_ids)
        return [self._row_positions[int(i)] for i in values]

    def get_train_dataloader(self):
        if self._needs_row_ids() and self.train_row_ids is None:
            self._index_train_rows()  # the column must exist before the dataloader is built
        return super().get_train_dataloader()

    # -- training ---------------------------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        if self.defenses and resume_from_checkpoint:
            checkpoint = resume_from_checkpoint
            if checkpoint is True:
                checkpoint = get_last_checkpoint(self.args.output_dir)
                if checkpoint is None:
                    raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
            state_path = os.path.join(str(checkpoint), DEFENSE_STATE_NAME)
            if not os.path.exists(state_path):
                raise FileNotFoundError(
                    f"{checkpoint} has no {DEFENSE_STATE_NAME}: it was not written by a BackdoorSafeTrainer with "
                    "these defenses, and resuming would silently redo or lose the defenses' detection."
                )
            self._load_defense_states(torch.load(state_path, weights_only=True), checkpoint)
        from .vision.transforms import record_training_augmentation

        # Saved with the model, so that a defense given raw image rows later augments them as the model was trained.
        record_training_augmentation(self.model, self.train_dataset)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def _defense_states(self) -> dict[str, Any]:
        return {"format": 2, "defenses": [{"name": d.name, "state": d.state_dict()} for d in self.defenses]}

    def _load_defense_states(self, saved: dict[str, Any], checkpoint) -> None:
        if saved.get("format") != 2:  # written by a single-defense trainer before stacks
            entries = [{"name": self.defenses[0].name, "state": saved}] if len(self.defenses) == 1 else []
        else:
            entries = saved["defenses"]
        names = [e["name"] for e in entries]
        if names != [d.name for d in self.defenses]:
            raise ValueError(
                f"{checkpoint} holds the state of defenses {names}, but this trainer runs "
                f"{[d.name for d in self.defenses]}: resume with the same defense stack."
            )
        for defense, entry in zip(self.defenses, entries):
            defense.load_state_dict(entry["state"])

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.defenses:
            row_ids = inputs.pop(ROW_INDEX, None)
            self.batch_row_ids = row_ids
            if row_ids is None and self._needs_row_ids():
                raise ValueError(
                    f"The training batch has no {ROW_INDEX!r} column, so the defenses cannot tell its rows apart; "
                    "a custom data collator or transform dropped it. Pass it through (for images: "
                    "`prepare_image_dataset(..., keep_row_index=True)`)."
                )
            for defense in self.defenses:
                inputs = defense.prepare_inputs(self, inputs)
        return super().training_step(model, inputs, num_items_in_batch)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.defenses and model.training:
            for defense in self.defenses:
                result = defense.compute_loss(self, model, inputs, return_outputs)
                if result is not None:
                    # A defense's loss is a mean over this micro-batch; the Trainer then divides it by the
                    # accumulation steps, so every defense trains at the scale of Trainer's own loss.
                    self.loss_is_scaled_for_ga = False
                    return result
        self.loss_is_scaled_for_ga = None
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    # -- reports ----------------------------------------------------------------------------------------------------
    def _write_defense_report(self) -> None:
        self.defense_reports = [d.report() for d in self.defenses]
        scalars = {}
        for defense, report in zip(self.defenses, self.defense_reports):
            scalars.update({f"{defense.name}/{k}": v for k, v in type(defense).report_scalars(report).items()})
        if scalars:
            self.log(scalars)
        if self.is_world_process_zero():
            name = getattr(self.args, "defense_report_name", "defense_report.json")
            os.makedirs(self.args.output_dir, exist_ok=True)
            write_json_atomic(os.path.join(self.args.output_dir, name), {**self.defense_report, "run_id": self.run_id})

    def add_defense_report(self, report: dict[str, Any]) -> None:
        """Record a post-training defense's report (``sanitize``/``expose``), so the card shows it."""
        self.defense_reports = [*self.defense_reports, report]

    def expose(self, clean_dataset, config=None):
        """An exposed copy of the trained model (EBYD: Clean Unlearning by default); the model is left untouched.

        See ``hf_backdoor/defenses/exposure.py``.
        """
        from .defenses.exposure import expose_model

        result = expose_model(self, clean_dataset, config)
        self.add_defense_report(result.report())
        return result

    def sanitize(self, clean_dataset, defense, exposed=None):
        """Post-training backdoor removal with a small clean set (``RNPConfig``, ``NADConfig``, ``NWCConfig``):
        returns the repaired model and its report. ``exposed`` (RNP and NWC only): the result of
        :meth:`expose`, used in place of the defense's own clean unlearning (EBYD). See
        ``hf_backdoor/defenses/sanitize.py``."""
        from .defenses.sanitize import sanitize_model

        model, report = sanitize_model(self, clean_dataset, defense, exposed=exposed)
        self.add_defense_report(report)
        return model, report

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
        from .hub.cards import build_model_card
        from .hub.reports import write_report
        from .hub.run_folder import make_readable

        os.makedirs(output_dir, exist_ok=True)
        report_path = os.path.join(output_dir, "defense_report.json")
        if self.defense_report is not None:
            write_json_atomic(report_path, {**self.defense_report, "run_id": self.run_id})
        elif os.path.exists(report_path):
            # Left by an earlier run in the same folder: it does not describe this model.
            os.remove(report_path)
        write_json_atomic(
            os.path.join(output_dir, RUN_INFO_NAME),
            {"run_id": self.run_id, "defenses": [r.get("defense") for r in self.defense_reports]},
        )
        write_json_atomic(os.path.join(output_dir, "backdoor_evaluations.json"), self.backdoor_evaluations)
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
            output_dir=output_dir,
        )
        card.save(os.path.join(output_dir, "README.md"))
        # safetensors writes through a 0600 temporary file: make the saved folder readable as the umask allows.
        make_readable(output_dir)


def _averages_each_micro_batch(model) -> bool:
    """Whether ``model``'s own loss is a mean over each micro-batch whatever ``num_items_in_batch`` says: the
    sequence and image classification heads (``BertForSequenceClassification``, ``ViTForImageClassification``...)."""
    get_base_model = getattr(model, "get_base_model", None)  # a peft model wraps the transformers one
    name = type(get_base_model() if callable(get_base_model) else model).__name__
    return name.endswith(("ForSequenceClassification", "ForImageClassification"))


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile")


def cpu_bf16_flags(cpuinfo: str | Path = "/proc/cpuinfo") -> list[str] | None:
    """Which of the CPU flags behind torch's bfloat16 kernels (AVX512-BF16, AMX) the CPU has; ``None`` where
    ``/proc/cpuinfo`` cannot be read (other systems)."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return [flag for flag in BF16_CPU_FLAGS if flag in flags]


def cpu_has_bf16_instructions(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether the CPU has bfloat16 instructions (AVX512-BF16 or AMX-BF16); ``True`` where ``/proc/cpuinfo`` cannot
    be read, so that nothing is claimed there."""
    flags = cpu_bf16_flags(cpuinfo)
    return flags is None or bool({"avx512_bf16", "amx_bf16"} & set(flags))
