"""Model cards for models trained or repaired by ``BackdoorSafeTrainer``, rendered with ``huggingface_hub.ModelCard``.

The template is ``model_cards/backdoor_safe_model_card.md`` (shipped inside the package as
``hf_backdoor/model_cards``). The card only reads what the trainer recorded: the defense report, the backdoor
evaluations (``trainer.evaluate_backdoor`` and ``trainer.add_backdoor_evaluation``), the training arguments and
the library versions. Its ``model-index`` block lists CACC and ASR per evaluated attack, so the Hub renders them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

TEMPLATE_PATH = Path(__file__).resolve().parent / "model_cards" / "backdoor_safe_model_card.md"
VERSIONED_PACKAGES = ("hf-backdoor", "transformers", "torch", "datasets", "accelerate", "peft", "huggingface_hub")


@dataclass
class CardFigure:
    title: str
    path: str  # relative to the card's folder


def library_versions() -> dict[str, str]:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def _base_model(trainer, finetuned_from: str | None) -> str | None:
    if finetuned_from:
        return finetuned_from
    from .models import model_display_name

    model = trainer.accelerator.unwrap_model(trainer.model)
    name = getattr(model.config, "_name_or_path", "")
    return model_display_name(name) if name else None


def _pipeline_tag(trainer) -> str:
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ImageClassification" in type(model).__name__:
        return "image-classification"
    return "text-classification"


def _evaluation_table(evaluations: list[dict]) -> str:
    if not evaluations:
        return "_No backdoor evaluation was recorded: call `trainer.evaluate_backdoor(...)` before saving._"
    lines = ["| model | evaluation set | attack | CACC | ASR | ASR floor |", "|---|---|---|---|---|---|"]
    for ev in evaluations:
        asr = "–" if ev.get("asr") is None else f"{ev['asr']:.3f}"
        floor = "–" if ev.get("asr_floor") is None else f"{ev['asr_floor']:.3f}"
        lines.append(
            f"| {ev.get('model', 'this model')} | {ev.get('dataset') or '–'} | {ev.get('attack') or '–'} | "
            f"{ev['cacc']:.3f} | {asr} | {floor} |"
        )
    return "\n".join(lines)


def _findings(report: dict) -> str:
    if report is None:
        return "_No defense report._"
    if report.get("defense") == "btu":
        flagged = report.get("flagged_tokens") or []
        rates = report.get("flip_rates") or {}
        lines = [
            f"- Candidates from the exposure rounds: {len(report.get('candidate_ids') or [])} tokens "
            f"(top {report.get('top_k')} per round of a {report.get('vocab_size')}-token vocabulary).",
            f"- Flagged as trigger tokens: **{len(flagged)}**"
            + (": " + ", ".join(f"`{t}` (flip rate {rates[t]:.2f})" if t in rates else f"`{t}`" for t in flagged))
            if flagged
            else "- Flagged as trigger tokens: **none**.",
        ]
        if report.get("flip_threshold") is not None:
            others = sorted((v for t, v in rates.items() if t not in flagged), reverse=True)
            highest = f"{others[0]:.2f}" if others else "–"
            lines.append(
                f"- A candidate is flagged when deleting it flips the model's prediction on at least "
                f"{report['flip_threshold']:.2f} of the training rows containing it; the highest unflagged "
                f"candidate flipped {highest}."
            )
        if report.get("num_isolated_rows"):
            lines.append(
                f"- Training rows whose prediction the flagged tokens decided: {report['num_isolated_rows']} "
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
    if report.get("defense") == "abl":
        isolation = report.get("isolation") or {}
        lines = [
            f"- Isolated after epoch {report.get('isolation_epoch')}: **{report.get('num_isolated_rows', 0)}** "
            f"training rows of {isolation.get('num_rows', '?')} (the lowest per-row loss under LGA; cut at loss "
            f"{isolation.get('loss_threshold', float('nan')):.3g})."
        ]
        if "precision" in isolation:
            lines.append(
                f"- Against the data's ground truth: precision {isolation['precision']:.2f}, recall "
                f"{isolation['recall']:.2f}"
                + (f", loss AUROC {isolation['loss_auroc']:.2f}." if "loss_auroc" in isolation else ".")
            )
        unlearning = report.get("unlearning") or []
        if len(unlearning) > 1:
            lines.append(
                f"- Unlearning (gradient ascent on the isolated rows, {len(unlearning) - 1} epochs): their accuracy "
                f"on their own labels {unlearning[0]['isolated_accuracy']:.2f} -> {unlearning[-1]['isolated_accuracy']:.2f}."
            )
        guard = report.get("unlearning_guard") or {}
        if guard:
            lines.append(
                f"- Unlearning guard ({guard['rows']} clean held-out rows, accuracy {guard['baseline_accuracy']:.3f} "
                f"before unlearning): {len(guard['undone_steps'])} step(s) undone for costing them too much accuracy."
            )
        return "\n".join(lines)
    scalars = {k: v for k, v in report.items() if isinstance(v, (int, float, str)) and k not in ("defense",)}
    if not scalars:
        return "_See `defense_report.json`._"
    return "\n".join(f"- `{k}`: {v}" for k, v in scalars.items())


def _limits(defense_name: str | None, evaluations: list[dict]) -> str:
    from .attacks import ATTACKS

    tested = sorted({ev["attack"] for ev in evaluations if ev.get("attack")})
    untested = [a for a in sorted(ATTACKS) if a not in tested]
    lines = [
        f"- Evaluated against: {', '.join(tested) if tested else 'no attack'}. "
        f"Not evaluated against: {', '.join(untested) if untested else 'none of the packaged attacks'}; "
        "nor against adaptive attacks designed to evade this defense.",
        "- The numbers above hold for the evaluation sets named; a different trigger, poison rate or data "
        "distribution can behave differently.",
    ]
    if defense_name == "btu":
        lines.append(
            "- BTU finds token triggers (rare words, inserted sentences). Syntactic and style (paraphrase) triggers "
            "are not tokens: BTU does not remove them; use a sample- or layer-level defense for those."
        )
    return "\n".join(lines)


def _training_table(trainer, train_rows: int | None) -> str:
    args = trainer.args
    defense_seed = getattr(getattr(trainer.defense, "config", None), "seed", None)
    rows = [
        ("training rows", train_rows if train_rows is not None else "–"),
        ("epochs", args.num_train_epochs),
        ("learning rate", args.learning_rate),
        ("batch size per device", args.per_device_train_batch_size),
        ("processes", args.world_size),
        ("precision", "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"),
        ("seed (training / defense)", f"{args.seed} / {defense_seed if defense_seed is not None else '–'}"),
    ]
    return "\n".join(["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def _defense_meta(trainer) -> tuple[str | None, str, str | None, dict, str]:
    """Name, title, citation, config and timing of the defense behind the model: the training-time defense, or
    the post-training one whose report the trainer holds (``trainer.sanitize``)."""
    report = trainer.defense_report or {}
    config = getattr(trainer.defense, "config", None)
    when = "during fine-tuning"
    if config is None and report.get("defense"):
        when = "after training, with a small clean set"
        try:
            from .defenses.sanitize import get_sanitize_config

            config = get_sanitize_config(dict(report.get("config") or {"name": report["defense"]}))
        except (ImportError, TypeError, ValueError):
            config = None
    if config is None:
        name = report.get("defense")
        return name, (name.upper() if name else "no"), None, dict(report.get("config") or {}), when
    if config.name == "btu":
        when = "during fine-tuning (detection from embedding drift, then token-level unlearning)"
    title = getattr(config, "title", None) or config.name.upper()
    return config.name, title, getattr(config, "citation", None), config.to_dict(), when


def build_model_card(
    trainer,
    *,
    model_name: str | None = None,
    finetuned_from: str | None = None,
    dataset: str | None = None,
    language: str | list[str] | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
    figures: list[CardFigure] | None = None,
    repo_hint: str | None = None,
) -> ModelCard:
    """The card of ``trainer``'s model (see the module docstring for what it reads)."""
    report = trainer.defense_report
    defense_name, title, citation, config_dict, when = _defense_meta(trainer)
    base_model = _base_model(trainer, finetuned_from)
    model_name = model_name or Path(trainer.args.output_dir).name
    pipeline_tag = _pipeline_tag(trainer)
    evaluations = list(getattr(trainer, "backdoor_evaluations", []))
    train_rows = len(trainer.train_dataset) if trainer.train_dataset is not None else None

    eval_results = []
    for ev in evaluations:
        if ev.get("model", "this model") != "this model":
            continue  # the model-index describes this model only; other rows are context in the table
        dataset_name = ev.get("dataset") or dataset or "evaluation set"
        common = dict(task_type=pipeline_tag, dataset_type=dataset or dataset_name, dataset_name=dataset_name)
        eval_results.append(
            EvalResult(metric_type="accuracy", metric_name="Clean accuracy (CACC)", metric_value=ev["cacc"], **common)
        )
        if ev.get("asr") is not None:
            eval_results.append(
                EvalResult(
                    metric_type="attack_success_rate",
                    metric_name=f"Attack success rate, {ev.get('attack') or 'triggered'} (ASR; lower is better)",
                    metric_value=ev["asr"],
                    **common,
                )
            )
    card_data = ModelCardData(
        model_name=model_name,
        base_model=base_model if base_model and "/" in base_model else None,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license=license,
        language=language,
        datasets=[dataset] if dataset else None,
        tags=sorted({"hf-backdoor", "backdoor-defense", *([defense_name] if defense_name else []), *(tags or [])}),
        eval_results=eval_results or None,
    )
    summary = f"Method: {title}" + (f" ({citation})." if citation else ".")
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        task_description="image classifier" if pipeline_tag == "image-classification" else "text classifier",
        base_model=base_model,
        base_model_url=f"https://huggingface.co/{base_model}" if base_model and "/" in base_model else base_model,
        defense_title=title,
        defense_when=when,
        defense_summary=summary,
        evaluation_table=_evaluation_table(evaluations),
        findings=_findings(report),
        defense_config=json.dumps(config_dict, indent=1),
        training_table=_training_table(trainer, train_rows),
        versions=", ".join(f"{k} {v}" for k, v in library_versions().items()),
        limits=_limits(defense_name, evaluations),
        figures=figures or [],
        pipeline_tag=pipeline_tag,
        repo_hint=repo_hint or model_name,
    )


def card_metadata(card: ModelCard) -> dict[str, Any]:
    """The card's YAML metadata as a dict (what the Hub reads)."""
    return card.data.to_dict()
