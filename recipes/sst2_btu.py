"""BTU during fine-tuning: a clean model (its ASR is the floor), the plain ``Trainer`` on poisoned data (undefended)
and ``BackdoorSafeTrainer`` with BTU on the same poisoned data.

    accelerate launch recipes/sst2_btu.py                                # SST-2, BadNet 10%, target 1, MiniLM-L6
    accelerate launch recipes/sst2_btu.py --dataset hsol --attack badnet,addsent
    accelerate launch recipes/sst2_btu.py --btu_paper                    # the published procedure, BTUConfig.paper()
    accelerate launch recipes/sst2_btu.py --defense_kwargs '{"flip_threshold": 0.7}' --runs btu
    accelerate launch recipes/sst2_btu.py --max_train_samples 500 --max_eval_samples 300   # a quick look

Each run prints its CACC and ASR beside the floor as soon as it ends; then come a table, the tokens BTU flagged and
the time of its phases. Besides this recipe's flags, every ``BackdoorSafeTrainingArguments`` field is a flag
(``--learning_rate``, ``--num_train_epochs``, ``--defense_kwargs`` with ``BTUConfig`` fields, ...); the defaults are
the reference training (lr 1e-4, 3 epochs, batch 32, seed 0). ``--results_json`` writes the records.
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
    recipe_defense,
    selected_runs,
)

RUNS = ("clean", "undefended", "btu")


@dataclass
class ScriptArguments(TextRecipeArguments):
    attack: str = field(
        default="badnet",
        metadata={
            "help": f"Attack, or several comma-separated sharing one clean model ({', '.join(sorted(ATTACKS))})."
        },
    )
    triggers: str | None = field(
        default=None, metadata={"help": "BadNet trigger words, comma-separated (None: cf,mn,bb,tq,mb)."}
    )
    btu_paper: bool = field(
        default=False, metadata={"help": "The published BTU procedure (BTUConfig.paper()), --defense_kwargs on top."}
    )
    clean_data: bool = field(
        default=False, metadata={"help": "Train every run on the unpoisoned data (what BTU flags without a backdoor)."}
    )
    runs: str = field(default=",".join(RUNS), metadata={"help": f"Comma-separated subset of {','.join(RUNS)}."})
    results_json: str | None = field(default=None, metadata={"help": "Write the records here (a JSON list)."})


def parse_args(argv=None) -> tuple[ScriptArguments, BackdoorSafeTrainingArguments]:
    parser = HfArgumentParser(
        (ScriptArguments, BackdoorSafeTrainingArguments), description=__doc__, formatter_class=RecipeHelpFormatter
    )
    parser.set_defaults(**device_defaults(), **TEXT_TRAINING_DEFAULTS, output_dir="runs/sst2-btu", defense=["btu"])
    return parser.parse_args_into_dataclasses(argv)


def main(argv=None) -> list[dict]:
    script, training_args = parse_args(argv)
    prepare_recipe_process()
    run_names = selected_runs(script.runs, RUNS)
    if training_args.defense != ["btu"]:
        raise SystemExit(f"This recipe trains with BTU (--defense btu); got --defense {training_args.defense}.")
    seed, model_name = training_args.seed, script.model_name_or_path or default_text_model()
    task = limit_splits(load_task(script.dataset), script.max_train_samples, script.max_eval_samples, seed)
    label_names = task["train"].features["label"].names
    attacks = [
        attack_for_task(name.strip(), script.dataset, poison_rate=script.poison_rate, target_label=script.target_label,
                        seed=seed, triggers=script.triggers)
        for name in script.attack.split(",") if name.strip()
    ]  # fmt: skip
    target = attacks[0].target_label
    tokenizer = load_text_tokenizer(model_name)
    poisoned = {a.name: poison_dataset(task["train"], a, tokenizer=tokenizer) for a in attacks}
    test_set = tokenize_dataset(task["test"], tokenizer, script.max_length)
    asr_sets = {
        a.name: tokenize_dataset(make_asr_dataset(task["test"], a), tokenizer, script.max_length) for a in attacks
    }
    # --defense_kwargs on top of the published procedure's fields (--btu_paper) or of BTUConfig's defaults
    defense = recipe_defense(training_args, btu_records.paper_fields() if script.btu_paper else None)
    variant = btu_records.btu_variant(defense, script.btu_paper)
    command = records.command_line("recipes/sst2_btu.py", sys.argv[1:] if argv is None else argv)
    # A run on clean data is trained once and scored on every attack's triggered rows (the clean model's score
    # there is each attack's ASR floor); a run on poisoned data is trained once per attack.
    jobs = [(run, a) for run in run_names for a in ([None] if run == "clean" or script.clean_data else attacks)]
    all_records, floors = [], {}
    for run, attack in jobs:
        train = poisoned[attack.name] if attack is not None else task["train"]
        scored = [attack] if attack is not None else attacks
        name = run if attack is None or len(attacks) == 1 else f"{run}_{attack.name}"
        result = fine_tune_and_evaluate(
            dataclasses.replace(training_args, output_dir=str(Path(training_args.output_dir) / name)),
            model_name, label_names, train, test_set, asr_sets[scored[0].name], max_length=script.max_length,
            defense=defense if run == "btu" else None, target_label=target,
        )  # fmt: skip
        for scored_attack in scored:
            evaluation = result.evaluation
            if scored_attack is not scored[0]:
                evaluation = evaluate_backdoor(result.trainer, test_set, asr_sets[scored_attack.name], target)
            record = btu_records.run_record(
                script.dataset, run, attack, scored_attack, evaluation, result, training_args,
                model=model_display_name(model_name), command=command, asr_floor=floors.get(scored_attack.name),
            )  # fmt: skip
            if run == "btu":
                report = result.trainer.defense_report
                record.update(btu_records.btu_fields(report, scored_attack, tokenizer, variant, train))
            if run == "clean":
                floors[scored_attack.name] = evaluation.asr
            all_records.append(record)
            if result.trainer.is_world_process_zero():  # each run's result as soon as it is known
                btu_records.print_run(name, record)
    btu_records.fill_floors_and_overheads(all_records)
    if result.trainer.is_world_process_zero():
        title = f"{script.dataset} / rate {script.poison_rate} target {target} / {model_display_name(model_name)}"
        btu_records.print_summary(all_records, f"{title} / BTU {variant}" + " / clean data" * script.clean_data)
        if script.results_json:
            records.write_records(script.results_json, all_records)
    return all_records


if __name__ == "__main__":
    main()
