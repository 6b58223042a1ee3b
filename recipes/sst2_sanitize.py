"""Post-training backdoor removal on text: train (or load) a backdoored model, then repair it with a few clean rows.

    accelerate launch recipes/sst2_sanitize.py                                 # SST-2, BadNet 10%, MiniLM-L6, RNP
    accelerate launch recipes/sst2_sanitize.py --defenses rnp,nad,nwc,finetune  # several defenses, same weights
    accelerate launch recipes/sst2_sanitize.py --floor                          # also a clean model: the ASR floor
    accelerate launch recipes/sst2_sanitize.py --load_model runs/sst2-sanitize/undefended   # repair a saved model
    accelerate launch recipes/sst2_sanitize.py --defenses rnp,nwc --exposed     # also EBYD's CUL-exposed variants

Every defense starts from the same undefended weights and gets the same clean rows: ``--clean_fraction`` (5%) of the
training-set size, from the validation split by default (``--clean_from``). Defenses choose their thresholds on a
held-out part of these rows, so the source matters: a model that memorised its training rows loses accuracy on them
faster than on new data when pruned. Each defense prints CACC and ASR (beside the floor with ``--floor``) as soon as
it ends. Besides this recipe's flags, every ``TrainingArguments`` field is a flag; the defaults are the reference
training (lr 1e-4, 3 epochs, batch 32, seed 0). ``--results_json`` writes the records. Images:
``recipes/cifar10_sanitize.py``.
"""

import dataclasses
import sys
from pathlib import Path

from transformers import (
    AutoModelForSequenceClassification,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)

from hf_backdoor import default_text_model, load_text_tokenizer, make_asr_dataset, poison_dataset, tokenize_dataset
from hf_backdoor.data import attack_for_task, load_task
from hf_backdoor.metrics import evaluate_backdoor
from hf_backdoor.models import model_display_name

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: benchmarks/common, not installed
from benchmarks.common import repair  # noqa: E402
from benchmarks.common.launch import prepare_recipe_process  # noqa: E402
from benchmarks.common.runs import (  # noqa: E402
    TEXT_TRAINING_DEFAULTS,
    RunResult,
    TextRecipeArguments,
    fine_tune_and_evaluate,
    limit_splits,
    save_trained_model,
    saved_training_epochs,
    saved_training_wall,
)

ScriptArguments = TextRecipeArguments  # this recipe's data, attack and model flags are the shared ones


def parse_args(argv=None) -> tuple[ScriptArguments, repair.RepairArguments, TrainingArguments]:
    return repair.parse_recipe_args(ScriptArguments, TEXT_TRAINING_DEFAULTS, "runs/sst2-sanitize", __doc__, argv)


def main(argv=None) -> list[dict]:
    script, repair_args, training_args = parse_args(argv)
    prepare_recipe_process()
    seed, out = training_args.seed, Path(training_args.output_dir)
    configs = repair.repair_configs(repair_args, seed)  # bad defense settings fail before any training
    model_name = script.model_name_or_path or default_text_model()
    task = limit_splits(load_task(script.dataset), script.max_train_samples, script.max_eval_samples, seed)
    label_names = task["train"].features["label"].names
    attack = attack_for_task(
        script.attack, script.dataset, poison_rate=script.poison_rate, target_label=script.target_label, seed=seed
    )
    # a saved model's own tokenizer (trainer.save_model writes it beside the weights), else the base model's
    tokenizer = load_text_tokenizer(repair_args.load_model or model_name)
    poisoned = poison_dataset(task["train"], attack, tokenizer=tokenizer)
    clean, test, clean_source = repair.clean_split(repair_args, task, poisoned, seed, text=True)
    test_set = tokenize_dataset(test, tokenizer, script.max_length)
    asr_set = tokenize_dataset(make_asr_dataset(test, attack), tokenizer, script.max_length)
    target = attack.target_label

    def train(rows, name: str) -> RunResult:
        args = dataclasses.replace(training_args, output_dir=str(out / name))
        return fine_tune_and_evaluate(
            args, model_name, label_names, rows, test_set, asr_set, max_length=script.max_length, target_label=target
        )

    def plain_trainer(model_path: str) -> Trainer:
        model = AutoModelForSequenceClassification.from_pretrained(model_path)
        args = dataclasses.replace(training_args, output_dir=str(out / "undefended"))
        return Trainer(
            model=model, args=args, processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer)
        )

    model_epochs = training_args.num_train_epochs
    if repair_args.load_model:
        trainer, wall = plain_trainer(repair_args.load_model), saved_training_wall(repair_args.load_model)
        model_epochs = saved_training_epochs(repair_args.load_model)
    else:
        undefended = train(poisoned, "undefended")
        trainer, wall = undefended.trainer, undefended.wall_s
        save_trained_model(trainer, out / "undefended", wall, training_args.num_train_epochs)
    floor = None
    if repair_args.floor:
        floor = train(task["train"], "clean").evaluation.asr
    if repair_args.floor_model:
        floor = evaluate_backdoor(plain_trainer(repair_args.floor_model), test_set, asr_set, target_label=target).asr
    setup = repair.RepairSetup(
        trainer=trainer,
        clean=tokenize_dataset(clean, tokenizer, script.max_length),
        evaluate=lambda: evaluate_backdoor(trainer, test_set, asr_set, target_label=target),
        train_wall_s=wall,
        floor=floor,
        base_record=repair.recipe_record(
            script,
            attack,
            model_display_name(model_name),
            seed,
            clean_source,
            "text",
            "recipes/sst2_sanitize.py",
            argv,
            model_epochs,
        ),
    )
    return repair.score_recipe(setup, configs, repair_args, seed)


if __name__ == "__main__":
    main()
