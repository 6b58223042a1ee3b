"""The default small ViT trained from scratch on CIFAR-10 with an image backdoor, without and with ABL.

    accelerate launch recipes/cifar10_vit.py                           # packaged copy, BadNets 10%, target 0
    accelerate launch recipes/cifar10_vit.py --dataset ../shared/data/cifar10_32.npz --bf16   # the reference setting
    accelerate launch recipes/cifar10_vit.py --attack blended --runs undefended,abl
    accelerate launch recipes/cifar10_vit.py --dataset ../shared/data/cifar10_32.npz --config_overrides cpu \\
        --num_train_epochs 45 --per_device_train_batch_size 64   # the CPU preset (24-32 minutes a run on 2 cores)
    python recipes/cifar10_vit.py --num_train_epochs 1 --max_train_samples 300 --max_eval_samples 200   # a smoke run

Runs (``--runs``): ``clean`` (no poison: its ASR on the triggered rows is the ASR floor), ``undefended`` (plain
``Trainer`` on the poisoned data) and ``abl`` (``BackdoorSafeTrainer`` with ``ABLConfig``: ``--defense_kwargs`` on top
of ``ABL_DEFAULTS``, the setting measured on this ViT: batch LGA, isolation after 5 epochs, complementary-label
unlearning until the isolated rows are unlearnt). ABL's isolation needs the trigger learned early; the default random
crop moves a corner patch and delays it (README): with ``--crop_padding 0`` ABL met its bar on the ``cpu`` preset.
Each run prints CACC and ASR as soon as it ends; then a table with ABL's isolation precision/recall. Besides this
recipe's flags, every ``BackdoorSafeTrainingArguments`` field is a flag; the defaults are the reference ViT training
(AdamW lr 1e-3, weight decay 0.05, warm-up then cosine decay, label smoothing 0.1, batch 128, 60 epochs, random crop
with reflect padding 4 and flip). ``--results_json`` writes the records.
"""

import sys
from dataclasses import dataclass, field
from pathlib import Path

from transformers import HfArgumentParser

from hf_backdoor import make_asr_dataset, poison_dataset
from hf_backdoor.arguments import BackdoorSafeTrainingArguments
from hf_backdoor.vision import load_image_task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: benchmarks/common, not installed
from benchmarks.common import records, vision  # noqa: E402
from benchmarks.common.launch import RecipeHelpFormatter, device_defaults, prepare_recipe_process  # noqa: E402
from benchmarks.common.runs import limit_splits, recipe_defense, selected_runs  # noqa: E402

RUNS = ("clean", "undefended", "abl")
# The ABL setting measured to meet its bar on this ViT on seeds 0-2 (README, "ABL's bar on both seeds" and "ABL on a
# third seed"): the official code's batch LGA, isolation after 5 epochs, and unlearning with the complementary-label
# loss until every isolated row has left its label. ABLConfig's own defaults (the paper's per-example LGA, the
# official 4-epoch ascent) did not remove the ViT's backdoor; they suit text fine-tuning.
ABL_DEFAULTS = {
    "isolation_epochs": 5,
    "lga": "batch",
    "unlearning_epochs": 20,
    "unlearning_stop_accuracy": 0.0,
    "unlearning_objective": "complementary",
}


@dataclass
class ScriptArguments(vision.ImageRecipeArguments):
    runs: str = field(default=",".join(RUNS), metadata={"help": f"Comma-separated subset of {','.join(RUNS)}."})
    save_models: bool = field(default=False, metadata={"help": "Save each run's model to OUTPUT_DIR/RUN."})
    clean_model: str | None = field(
        default=None,
        metadata={
            "help": "A clean model saved by an earlier --save_models run, scored instead of training the clean run "
            "(it depends on the data, seed and training, not on the attack)."
        },
    )
    results_json: str | None = field(default=None, metadata={"help": "Write the records here (a JSON list)."})


def load_data(script: ScriptArguments, seed: int):
    """The task (seeded slices when asked), the attack, the poisoned training rows and the ASR rows."""
    task = limit_splits(load_image_task(script.dataset), script.max_train_samples, script.max_eval_samples, seed)
    attack = script.attack_config(seed)
    return task, attack, poison_dataset(task["train"], attack), make_asr_dataset(task["test"], attack)


def parse_args(argv=None) -> tuple[ScriptArguments, BackdoorSafeTrainingArguments]:
    parser = HfArgumentParser(
        (ScriptArguments, BackdoorSafeTrainingArguments), description=__doc__, formatter_class=RecipeHelpFormatter
    )
    parser.set_defaults(
        **device_defaults(), **vision.VIT_TRAINING_DEFAULTS, output_dir="runs/cifar10-vit", defense=["abl"]
    )
    return parser.parse_args_into_dataclasses(argv)


def main(argv=None) -> list[dict]:
    script, training_args = parse_args(argv)
    prepare_recipe_process()
    run_names = selected_runs(script.runs, RUNS)
    model = vision.vit_name(script.model_name_or_path, script.config_overrides)
    task, attack, poisoned, asr_rows = load_data(script, training_args.seed)
    label_names = task["train"].features["label"].names
    epochs, command = (
        training_args.num_train_epochs,
        records.command_line("recipes/cifar10_vit.py", argv or sys.argv[1:]),
    )
    all_records, floor, plain_wall = [], None, None
    for run in run_names:
        rows = task["train"] if run == "clean" else poisoned
        run_dir = Path(training_args.output_dir) / run
        if run == "clean" and script.clean_model:
            loaded = vision.load_saved_vit(script.clean_model)
            if loaded is None or loaded[1] is None:
                raise SystemExit(f"--clean_model {script.clean_model}: no model saved by --save_models there")
            trainer, wall = loaded
        else:
            defense = recipe_defense(training_args, ABL_DEFAULTS) if run == "abl" else None
            # --save_models: e.g. for recipes/cifar10_sanitize.py --load_model
            trainer, wall = vision.train_recipe_vit(
                script, training_args, run_dir, rows, label_names, defense, save=script.save_models
            )
        evaluation = vision.evaluate_images(trainer, task["test"], asr_rows, attack.target_label)
        if run == "clean":
            floor = evaluation.asr
        if run == "undefended" or (run == "clean" and plain_wall is None):  # ABL's overhead: against plain training
            plain_wall = wall
        record = {
            "run": run,
            "dataset": records.dataset_name(script.dataset),
            "data": script.dataset if script.dataset != "cifar10" else "cifar10 (packaged subset)",
            "attack": "none" if run == "clean" else attack.name,
            "asr_attack": attack.name,
            "attack_kwargs": script.attack_kwargs_text,  # the attack's non-default settings, as JSON text
            "defense": "abl" if run == "abl" else "none",
            "model": model,
            "poison_rate": 0.0 if run == "clean" else attack.poison_rate,
            "cacc": evaluation.cacc,
            "asr": evaluation.asr,
            "asr_floor": floor,
            "wall_s": round(wall, 2),
            # overhead: wall time over plain training on the same data; overhead_epochs: the extra wall time in
            # epochs of that plain training.
            "overhead": round(wall / plain_wall, 3) if run == "abl" and plain_wall else None,
            "overhead_epochs": round((wall - plain_wall) / (plain_wall / epochs), 2) if run == "abl" and plain_wall else None,
            "epoch_s": round(wall / epochs, 3),
            "device": records.device_name(),
            "seed": training_args.seed,
            "epochs": epochs,
            "crop_padding": script.crop_padding,
            "num_train": len(rows),
            "num_test": len(task["test"]),
            "command": command,
        }  # fmt: skip
        if run == "abl":
            record.update(vision.abl_fields(trainer.defense_report, wall, epochs))
        all_records.append(record)
        if trainer.is_world_process_zero():  # each run's result as soon as it ends
            shown = "-" if floor is None else f"{floor:.3f}"
            print(f"[{run}] CACC {evaluation.cacc:.3f}  ASR {evaluation.asr:.3f}  ASR floor {shown}  "
                  f"trained in {wall:.1f} s", flush=True)  # fmt: skip
    for record in all_records:
        record["asr_floor"] = floor
    if trainer.is_world_process_zero():
        vision.print_runs(all_records)
        if script.results_json:
            records.write_records(script.results_json, all_records)
    return all_records


if __name__ == "__main__":
    main()
