"""Baseline: fine-tune a text classifier with the plain ``transformers.Trainer`` on clean and on poisoned data.

    accelerate launch recipes/sst2_baseline.py                           # SST-2, BadNet 10%, target 1, MiniLM-L6
    accelerate launch recipes/sst2_baseline.py --dataset hsol --attack addsent
    accelerate launch recipes/sst2_baseline.py --model_name_or_path bert-base-uncased --learning_rate 2e-5

Two runs on the same data and seed, ``clean`` and ``poisoned``; each prints its clean accuracy (CACC) and attack
success rate (ASR) as soon as it ends, the poisoned run beside the floor (the clean model's ASR on the same triggered
rows). Besides this recipe's flags, every ``TrainingArguments`` field is a flag (``--learning_rate``,
``--num_train_epochs``, ...); the defaults are the reference training (lr 1e-4, 3 epochs, batch 32, seed 0).
``--results_json`` writes the records. For the defense, see ``recipes/sst2_btu.py``.
"""

import dataclasses
import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser, TrainingArguments

from hf_backdoor import default_text_model, load_text_tokenizer, make_asr_dataset, poison_dataset, tokenize_dataset
from hf_backdoor.attacks import POISON_MODES
from hf_backdoor.data import attack_for_task, load_task
from hf_backdoor.models import model_display_name

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: benchmarks/common, not installed
from benchmarks.common import records  # noqa: E402
from benchmarks.common.launch import RecipeHelpFormatter, device_defaults, prepare_recipe_process  # noqa: E402
from benchmarks.common.runs import (  # noqa: E402
    TEXT_TRAINING_DEFAULTS,
    TextRecipeArguments,
    fine_tune_and_evaluate,
    limit_splits,
    selected_runs,
)

RUNS = ("clean", "poisoned")


@dataclass
class ScriptArguments(TextRecipeArguments):
    triggers: str | None = field(
        default=None, metadata={"help": "BadNet trigger words, comma-separated (None: cf,mn,bb,tq,mb)."}
    )
    mode: str = field(default="dirty", metadata={"help": "Which rows are poisoned.", "choices": list(POISON_MODES)})
    runs: str = field(default=",".join(RUNS), metadata={"help": f"Comma-separated subset of {','.join(RUNS)}."})
    results_json: str | None = field(default=None, metadata={"help": "Write the records here (a JSON list)."})


def parse_args(argv=None) -> tuple[ScriptArguments, TrainingArguments]:
    parser = HfArgumentParser(
        (ScriptArguments, TrainingArguments), description=__doc__, formatter_class=RecipeHelpFormatter
    )
    parser.set_defaults(**device_defaults(), **TEXT_TRAINING_DEFAULTS, output_dir="runs/sst2-baseline")
    return parser.parse_args_into_dataclasses(argv)


def main(argv=None) -> list[dict]:
    script, training_args = parse_args(argv)
    prepare_recipe_process()
    run_names = selected_runs(script.runs, RUNS)
    seed, model_name = training_args.seed, script.model_name_or_path or default_text_model()
    task = limit_splits(load_task(script.dataset), script.max_train_samples, script.max_eval_samples, seed)
    label_names = task["train"].features["label"].names
    attack = attack_for_task(
        script.attack, script.dataset, poison_rate=script.poison_rate, target_label=script.target_label,
        mode=script.mode, seed=seed, triggers=script.triggers,
    )  # fmt: skip
    tokenizer = load_text_tokenizer(model_name)
    train_sets = {"clean": task["train"], "poisoned": poison_dataset(task["train"], attack, tokenizer=tokenizer)}
    asr_set = tokenize_dataset(make_asr_dataset(task["test"], attack), tokenizer, script.max_length)
    test_set = tokenize_dataset(task["test"], tokenizer, script.max_length)
    command = records.command_line("recipes/sst2_baseline.py", sys.argv[1:] if argv is None else argv)
    all_records, floor = [], None
    for run in run_names:
        result = fine_tune_and_evaluate(
            dataclasses.replace(training_args, output_dir=str(Path(training_args.output_dir) / run)),
            model_name, label_names, train_sets[run], test_set, asr_set, max_length=script.max_length,
            target_label=attack.target_label,
        )  # fmt: skip
        if run == "clean":  # the floor: the clean model's ASR on the same triggered rows
            floor = result.evaluation.asr
        all_records.append(
            {
                "dataset": script.dataset,
                "attack": "none" if run == "clean" else attack.name,
                "defense": "none",
                "model": model_display_name(model_name),
                "poison_rate": 0.0 if run == "clean" else attack.poison_rate,
                "cacc": result.evaluation.cacc,
                "asr": result.evaluation.asr,
                "asr_floor": floor,
                "wall_s": round(result.wall_s, 2),
                "overhead": 1.0,
                "device": records.device_name(),
                "seed": seed,
                "command": command,
                "asr_attack": attack.name,
                "mode": attack.mode,
                "target_label": attack.target_label,
                "train_samples": len(train_sets[run]),
                "epochs": training_args.num_train_epochs,
                "learning_rate": training_args.learning_rate,
                "batch_size": training_args.per_device_train_batch_size,
                "train_samples_per_s": round(result.train_samples_per_s, 1),
            }
        )
        if result.trainer.is_world_process_zero():  # each run's result as soon as it ends
            shown = "-" if floor is None else f"{floor:.3f}"
            print(f"[{run}] CACC {result.evaluation.cacc:.3f}  ASR {result.evaluation.asr:.3f}  ASR floor {shown}  "
                  f"trained in {result.wall_s:.1f} s", flush=True)  # fmt: skip
    for record in all_records:
        record["asr_floor"] = floor
    if result.trainer.is_world_process_zero():
        print(f"\n{script.dataset} / {attack.name} {attack.mode} rate {attack.poison_rate} target {attack.target_label} "
              f"/ {model_display_name(model_name)}")  # fmt: skip
        print(f"{'run':<10}{'CACC':>8}{'ASR':>8}{'floor':>8}{'wall s':>9}")
        for record, run in zip(all_records, run_names):
            shown = "-" if record["asr_floor"] is None else f"{record['asr_floor']:.3f}"
            print(f"{run:<10}{record['cacc']:>8.3f}{record['asr']:>8.3f}{shown:>8}{record['wall_s']:>9.1f}")
        if script.results_json:
            records.write_records(script.results_json, all_records)
    return all_records


if __name__ == "__main__":
    main()
