"""Model cards for models trained or repaired by ``BackdoorSafeTrainer``, rendered with ``huggingface_hub.ModelCard``.

The template is ``hf_backdoor/model_cards/backdoor_safe_model_card.md``. The card only reads what the trainer
recorded: the defense reports, the backdoor evaluations (``trainer.evaluate_backdoor`` and
``trainer.add_backdoor_evaluation``), the training arguments and the library versions. It names no defense: each
report is rendered by the class that wrote it (``card_section``, ``card_limits``), found by the report's
``"defense"`` name in the registry, and the header reads the config class's ``title`` and ``citation``. A stack of
defenses gets one section per defense. The ``model-index`` block lists CACC and ASR per evaluated attack, so the Hub
renders them.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from ..defenses.base import Defense, Figure, defense_class_for_report, reports_from_json
from ..registry import DEFENSES
from .evaluations import dataset_fields, evaluation_notes, evaluation_table, is_hub_id
from .run_folder import read_run_info

TEMPLATE_PATH = Path(__file__).resolve().parents[1] / "model_cards" / "backdoor_safe_model_card.md"
VERSIONED_PACKAGES = ("hf-backdoor", "transformers", "torch", "datasets", "accelerate", "peft", "huggingface_hub")
# When each defense stage acts, for the card's first paragraph.
STAGE_WHEN = {"training": "during fine-tuning", "repair": "after training, with a small clean set"}

# The card's figures are the protocol's Figure (caption, path relative to the card's folder).
CardFigure = Figure


def library_versions() -> dict[str, str]:
    versions = {}
    for package in VERSIONED_PACKAGES:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def hub_dataset_id(dataset: str | None) -> str | None:
    """The Hub dataset a card's ``datasets`` metadata links to: a known task's Hub id (``sst2`` ->
    ``stanfordnlp/sst2``, whose copy is packaged), a Hub id as it is, nothing for a local path."""
    if not is_hub_id(dataset):
        return None
    from ..data import get_task_spec

    try:
        return get_task_spec(dataset).hub_id
    except ValueError:
        return dataset


def _base_model(trainer, finetuned_from: str | None) -> str | None:
    if finetuned_from:
        return finetuned_from
    from ..models import model_display_name

    model = trainer.accelerator.unwrap_model(trainer.model)
    name = getattr(model.config, "_name_or_path", "")
    return model_display_name(name) if name else None


def _pipeline_tag(trainer) -> str:
    model = trainer.accelerator.unwrap_model(trainer.model)
    if "ImageClassification" in type(model).__name__:
        return "image-classification"
    return "text-classification"


def _num_labels(trainer) -> int | None:
    model = trainer.accelerator.unwrap_model(trainer.model)
    return getattr(getattr(model, "config", None), "num_labels", None)


def defense_reports(trainer) -> list[dict[str, Any]]:
    """What each defense of the trainer recorded, in order; before training, each configured defense's config."""
    reports = reports_from_json(getattr(trainer, "defense_report", None))
    if reports:
        return reports
    return [{"defense": d.name, "config": d.config.to_dict()} for d in getattr(trainer, "defenses", None) or []]


def renderer(report: dict[str, Any]) -> type[Defense]:
    """The class that renders ``report``: the registered defense that wrote it, else the protocol's defaults (a
    report of a defense whose module is not installed still shows its numbers)."""
    return defense_class_for_report(report) or Defense


def defense_title(report: dict[str, Any]) -> tuple[str, str]:
    """``(title, citation)`` of the defense that wrote ``report``, from its config class."""
    name = str(report.get("defense") or "defense")
    entry = DEFENSES.get(name)
    config_class = entry.config_class if entry is not None else None
    title = getattr(config_class, "title", "") or name.upper()
    return title, getattr(config_class, "citation", "") or ""


def _defense_sentence(reports: list[dict[str, Any]]) -> str:
    if not reports:
        return "No backdoor defense ran: this is a plainly fine-tuned model."
    groups: list[tuple[str, list[str]]] = []  # consecutive defenses of one stage, in order
    for report in reports:
        when = STAGE_WHEN.get(getattr(defense_class_for_report(report), "stage", ""), "")
        title = f"**{defense_title(report)[0]}**"
        if groups and groups[-1][0] == when:
            groups[-1][1].append(title)
        else:
            groups.append((when, [title]))

    def listed(items: list[str]) -> str:
        return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]

    parts = [listed(titles) + (f" {when}" if when else "") for when, titles in groups]
    return f"It ran the backdoor defense{'s' if len(reports) > 1 else ''} {', then '.join(parts)}."


def _defense_summary(reports: list[dict[str, Any]]) -> str:
    lines = []
    for report in reports:
        title, citation = defense_title(report)
        lines.append(f"- {title}" + (f": {citation}." if citation else "."))
    return "\n".join(lines)


def findings_markdown(reports: list[dict[str, Any]]) -> str:
    """One section per defense: what it found and did (its class's ``card_section``)."""
    if not reports:
        return "_No defense ran, so there is nothing to report._"
    sections = []
    for report in reports:
        body = renderer(report).card_section(report).strip() or "_See `defense_report.json`._"
        sections.append(f"### {defense_title(report)[0]}\n\n{body}" if len(reports) > 1 else body)
    return "\n\n".join(sections)


def _defense_config(reports: list[dict[str, Any]]) -> str:
    configs = [r.get("config") or {"name": r.get("defense")} for r in reports]
    return json.dumps(configs[0] if len(configs) == 1 else configs, indent=1)


def _attack_names(pipeline_tag: str) -> list[str]:
    from ..attacks import ATTACKS, IMAGE_ATTACKS

    return sorted(IMAGE_ATTACKS if pipeline_tag == "image-classification" else ATTACKS)


def _canonical_attack(name: str) -> str:
    from ..registry import resolve_attack_name

    try:
        return resolve_attack_name(name)
    except Exception:  # a name the registry does not know stays as written
        return name


def limits_markdown(reports: list[dict[str, Any]], evaluations: list[dict], pipeline_tag: str) -> str:
    """What the evaluation does not cover, then each defense's own limits (``card_limits``)."""
    tested = sorted({_canonical_attack(ev["attack"]) for ev in evaluations if ev.get("attack")})
    untested = [a for a in _attack_names(pipeline_tag) if a not in tested]
    adaptive = "adaptive attacks designed to evade this defense" if reports else "adaptive attacks"
    lines = [
        f"- Evaluated against: {', '.join(tested) if tested else 'no attack'}. "
        f"Not evaluated against: {', '.join(untested) if untested else 'none of the packaged attacks'}; "
        f"nor against {adaptive}.",
        "- The numbers above hold for the evaluation sets named; a different trigger, poison rate or data "
        "distribution can behave differently.",
    ]
    for report in reports:
        for line in renderer(report).card_limits(report):
            line = line.strip()
            lines.append(line if line.startswith("- ") else f"- {line}")
    return "\n".join(lines)


def _training_table(trainer, reports: list[dict[str, Any]], run_id: str | None) -> str:
    if trainer.state.global_step == 0:
        table = ["_This trainer did not fine-tune the model: it was loaded, then evaluated or repaired._"]
        return "\n".join(table + ([f"\nRun id: `{run_id}`."] if run_id else []))
    args = trainer.args
    seeds = [(r.get("defense"), (r.get("config") or {}).get("seed")) for r in reports]
    seeds = [(name, seed) for name, seed in seeds if seed is not None]
    if not seeds:
        defense_seed = "–"
    elif len(seeds) == 1:
        defense_seed = str(seeds[0][1])
    else:
        defense_seed = ", ".join(f"{name} {seed}" for name, seed in seeds)
    train_rows = len(trainer.train_dataset) if trainer.train_dataset is not None else "–"
    rows = [
        ("training rows", train_rows),
        ("epochs", args.num_train_epochs),
        ("learning rate", args.learning_rate),
        ("batch size per device", args.per_device_train_batch_size),
        ("processes", args.world_size),
        ("precision", "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"),
        ("seed (training / defense)", f"{args.seed} / {defense_seed}"),
    ]
    if run_id:
        rows.append(("run id", f"`{run_id}`"))
    return "\n".join(["| setting | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def _eval_results(evaluations: list[dict], pipeline_tag: str, dataset: str | None) -> list[EvalResult]:
    results = []
    for ev in evaluations:
        if ev.get("model", "this model") != "this model":
            continue  # the model-index describes this model only; other rows are context in the table
        dataset_type, dataset_name = dataset_fields(ev.get("dataset") or dataset)
        common = dict(task_type=pipeline_tag, dataset_type=dataset_type, dataset_name=dataset_name)
        results.append(
            EvalResult(metric_type="accuracy", metric_name="Clean accuracy (CACC)", metric_value=ev["cacc"], **common)
        )
        if ev.get("asr") is not None:
            results.append(
                EvalResult(
                    metric_type="attack_success_rate",
                    metric_name=f"Attack success rate, {ev.get('attack') or 'triggered'} (ASR; lower is better)",
                    metric_value=ev["asr"],
                    **common,
                )
            )
    return results


def build_model_card(
    trainer,
    *,
    model_name: str | None = None,
    finetuned_from: str | None = None,
    dataset: str | None = None,
    language: str | list[str] | None = None,
    license: str | None = None,
    tags: list[str] | None = None,
    figures: list[Figure] | None = None,
    repo_hint: str | None = None,
    output_dir: str | os.PathLike | None = None,
) -> ModelCard:
    """The card of ``trainer``'s model (see the module docstring for what it reads).

    ``dataset``: the training task name or Hub id (``"sst2"``); a local path is shown as local files. ``output_dir``:
    the folder the card is written to; its ``run_info.json`` (written by the CLI) gives the run id.
    """
    reports = defense_reports(trainer)
    base_model = _base_model(trainer, finetuned_from)
    model_name = model_name or Path(trainer.args.output_dir).name
    pipeline_tag = _pipeline_tag(trainer)
    evaluations = list(getattr(trainer, "backdoor_evaluations", []))
    run_info = read_run_info(output_dir or trainer.args.output_dir) or {}
    base_is_hub = is_hub_id(base_model)
    if base_model is None:
        base_text = "trained from a randomly initialised or unrecorded base model"
    elif base_is_hub:
        base_text = f"fine-tuned from [`{base_model}`](https://huggingface.co/{base_model})"
    else:
        base_text = f"fine-tuned from a local model (`{Path(base_model).name or base_model}`)"
    card_data = ModelCardData(
        model_name=model_name,
        base_model=base_model if base_is_hub else None,
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        license=license,
        language=language,
        # The Hub links `datasets` to dataset repositories: a local path would be a broken link.
        datasets=[hub_dataset_id(dataset)] if hub_dataset_id(dataset) else None,
        tags=sorted({"hf-backdoor", "backdoor-defense", *(str(r.get("defense")) for r in reports), *(tags or [])}),
        eval_results=_eval_results(evaluations, pipeline_tag, dataset) or None,
    )
    notes = evaluation_notes(evaluations, _num_labels(trainer))
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        model_name=model_name,
        task_description="image classifier" if pipeline_tag == "image-classification" else "text classifier",
        base_text=base_text,
        defense_sentence=_defense_sentence(reports),
        defense_summary=_defense_summary(reports),
        evaluation_table=evaluation_table(evaluations),
        evaluation_notes="\n".join(notes),
        findings=findings_markdown(reports),
        defense_config=_defense_config(reports) if reports else None,
        training_table=_training_table(trainer, reports, run_info.get("run_id")),
        versions=", ".join(f"{k} {v}" for k, v in library_versions().items()),
        limits=limits_markdown(reports, evaluations, pipeline_tag),
        figures=figures or [],
        pipeline_tag=pipeline_tag,
        repo_hint=repo_hint or model_name,
    )


def card_metadata(card: ModelCard) -> dict[str, Any]:
    """The card's YAML metadata as a dict (what the Hub reads)."""
    return card.data.to_dict()
