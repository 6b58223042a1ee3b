"""A defense stack during fine-tuning, on any packaged text task and attack: a clean model (its ASR is the floor), the
plain ``Trainer`` on poisoned data (undefended) and ``BackdoorSafeTrainer`` with the stack on the same poisoned data.

    accelerate launch recipes/text_stack.py                                  # SST-2, syntactic 20%, BTU + Z-defense
    accelerate launch recipes/text_stack.py --attack style                   # SST-2, StyleBkd's Bible transfers
    accelerate launch recipes/text_stack.py --attack style --poison_rate 0.1 \
        --defense_kwargs '{"z_defense": {"min_wording_z": 2.5}}'             # a style at a low rate (opt-in)
    accelerate launch recipes/text_stack.py --dataset hsol --attack syntactic
    accelerate launch recipes/text_stack.py --dataset agnews --attack badnet,addsent --poison_rate 0.1
    accelerate launch recipes/text_stack.py --defense btu loss_truncation \\
        --defense_kwargs '{"loss_truncation": {"drop_fraction": 0.5}}' --runs undefended,defended
    accelerate launch recipes/text_stack.py --max_train_samples 500 --max_eval_samples 300   # a quick look

The default stack, ``[BTUConfig(), ZDefenseConfig()]``, runs BTU against token triggers (rare words, inserted
sentences) and Z-defense against dirty-label paraphrase triggers (a syntactic template's opening word, a style's
wording) in one run.
Z-defense is the default paraphrase defense because it measured best of the four built in (Z-defense, DPoE, loss
truncation, honeypot) on the same runs; what it does and does not stop is in the README ("Paraphrase triggers"). Each
run prints its CACC and ASR beside the floor as soon as it ends, then a table and each defense's summary. Every
``BackdoorSafeTrainingArguments`` field is a flag too (``--defense``, ``--defense_kwargs``, ``--learning_rate``, ...);
the defaults are the reference training (lr 1e-4, 3 epochs, batch 32, seed 0). ``--results_json`` writes the records.
"""

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from hf_backdoor import default_text_model, load_text_tokenizer, make_asr_dataset, poison_dataset, tokenize_dataset
from hf_backdoor.arguments import BackdoorSafeTrainingArguments
from hf_backdoor.attacks import ATTACKS
from hf_backdoor.data import attack_for_task, load_task
from hf_backdoor.defenses.base import defense_class_for_report, defense_specs
from hf_backdoor.metrics import evaluate_backdoor
from hf_backdoor.models import model_display_name

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: benchmarks/common, not installed
from benchmarks.common import btu_records, records  # noqa: E402
from benchmarks.common.launch import RecipeHelpFormatter, device_defaults, prepare_recipe_process  # noqa: E402
from benchmarks.common.runs import (  # noqa: E402
    TEXT_TRAINING_DEFAULTS,
    TextRecipeArguments,
    fine_tune_and_evaluate,
    limit_splits,
    selected_runs,
)

RUNS = ("clean", "undefended", "defended")
DEFAULT_STACK = ["btu", "z_defense"]


@dataclass
class ScriptArguments(TextRecipeArguments):
    attack: str = field(
        default="syntactic",
        metadata={
            "help": f"Attack, or several comma-separated sharing one clean model ({', '.join(sorted(ATTACKS))})."
        },
    )
    poison_rate: float = field(default=0.2, metadata={"help": "Share of training rows poisoned, in (0, 1]."})
    runs: str = field(default=",".join(RUNS), metadata={"help": f"Comma-separated subset of {','.join(RUNS)}."})
    results_json: str | None = field(default=None, metadata={"help": "Write the records here (a JSON list)."})


def parse_args(argv=None) -> tuple[ScriptArguments, BackdoorSafeTrainingArguments]:
    parser = HfArgumentParser(
        (ScriptArguments, BackdoorSafeTrainingArguments), description=__doc__, formatter_class=RecipeHelpFormatter
    )
    parser.set_defaults(
        **device_defaults(), **TEXT_TRAINING_DEFAULTS, output_dir="runs/text-stack", defense=DEFAULT_STACK
    )
    return parser.parse_args_into_dataclasses(argv)


def stack_fields(trainer) -> dict:
    """Each defense's report scalars, prefixed with its name (``btu/...``, ``z_defense/...``)."""
    fields = {"defense_stack": "+".join(report["defense"] for report in trainer.defense_reports)}
    for report in trainer.defense_reports:
        scalars = defense_class_for_report(report).report_scalars(report)
        fields.update({f"{report['defense']}/{name}": value for name, value in scalars.items()})
    return fields


def main(argv=None) -> list[dict]:
    script, training_args = parse_args(argv)
    prepare_recipe_process()
    run_names = selected_runs(script.runs, RUNS)
    if "defended" in run_names and not training_args.defense:
        raise SystemExit("The defended run needs a defense: --defense btu z_defense (the default).")
    seed, model_name = training_args.seed, script.model_name_or_path or default_text_model()
    task = limit_splits(load_task(script.dataset), script.max_train_samples, script.max_eval_samples, seed)
    label_names = task["train"].features["label"].names
    attacks = [
        attack_for_task(name.strip(), script.dataset, poison_rate=script.poison_rate, target_label=script.target_label,
                        seed=seed)
        for name in script.attack.split(",") if name.strip()
    ]  # fmt: skip
    target = attacks[0].target_label
    tokenizer = load_text_tokenizer(model_name)
    poisoned = {a.name: poison_dataset(task["train"], a, tokenizer=tokenizer) for a in attacks}
    test_set = tokenize_dataset(task["test"], tokenizer, script.max_length)
    asr_sets = {
        a.name: tokenize_dataset(make_asr_dataset(task["test"], a), tokenizer, script.max_length) for a in attacks
    }
    stack = [
        {"seed": seed, **spec} if spec["name"] == "btu" else spec
        for spec in defense_specs(training_args.defense or [], training_args.defense_kwargs)
    ]
    command = records.command_line("recipes/text_stack.py", sys.argv[1:] if argv is None else argv)
    jobs = [(run, a) for run in run_names for a in ([None] if run == "clean" else attacks)]
    all_records, floors = [], {}
    for run, attack in jobs:
        train = poisoned[attack.name] if attack is not None else task["train"]
        scored = [attack] if attack is not None else attacks
        name = run if attack is None or len(attacks) == 1 else f"{run}_{attack.name}"
        result = fine_tune_and_evaluate(
            dataclasses.replace(training_args, output_dir=str(Path(training_args.output_dir) / name)),
            model_name, label_names, train, test_set, asr_sets[scored[0].name], max_length=script.max_length,
            defense=stack if run == "defended" else None, target_label=target,
        )  # fmt: skip
        for scored_attack in scored:
            evaluation = result.evaluation
            if scored_attack is not scored[0]:
                evaluation = evaluate_backdoor(result.trainer, test_set, asr_sets[scored_attack.name], target)
            record = btu_records.run_record(
                script.dataset, run, attack, scored_attack, evaluation, result, training_args,
                model=model_display_name(model_name), command=command, asr_floor=floors.get(scored_attack.name),
            )  # fmt: skip
            if run == "defended":
                record.update(stack_fields(result.trainer), defense="+".join(spec["name"] for spec in stack))
            if run == "clean":
                floors[scored_attack.name] = evaluation.asr
            all_records.append(record)
            if result.trainer.is_world_process_zero():
                btu_records.print_run(name, record)
                if run == "defended":
                    for report in result.trainer.defense_reports:
                        for line in defense_class_for_report(report).console_summary(report):
                            print(f"  {line}")
    btu_records.fill_floors_and_overheads(all_records)
    if result.trainer.is_world_process_zero():
        title = f"{script.dataset} / rate {script.poison_rate} target {target} / {model_display_name(model_name)}"
        btu_records.print_summary(all_records, f"{title} / stack {'+'.join(s['name'] for s in stack) or 'none'}")
        if script.results_json:
            records.write_records(script.results_json, all_records)
    return all_records


if __name__ == "__main__":
    main()
