"""Post-training backdoor removal on images: train (or load) a backdoored small ViT, then repair it with clean rows.

    accelerate launch recipes/cifar10_sanitize.py                             # packaged CIFAR-10, BadNets 10%, RNP
    accelerate launch recipes/cifar10_sanitize.py --attack blended --defenses rnp,nad,nwc,finetune --floor
    accelerate launch recipes/cifar10_sanitize.py --load_model runs/cifar10-vit/undefended \\
        --floor_model runs/cifar10-vit/clean                                   # models saved by cifar10_vit.py --save_models
    accelerate launch recipes/cifar10_sanitize.py --defenses rnp,nwc --exposed --clean_from held-out

Every defense starts from the same undefended weights and gets the same clean rows: ``--clean_fraction`` (5%) of the
training-set size, unpoisoned training rows by default (the setting of the RNP/NAD/TSBD papers; ``--clean_from
held-out`` takes test rows out of the evaluation instead). Each defense prints CACC and ASR (beside the floor with
``--floor`` or ``--floor_model``) as soon as it ends. Besides this recipe's flags, every ``TrainingArguments`` field
is a flag; the defaults are the reference ViT training (AdamW lr 1e-3, weight decay 0.05, label smoothing 0.1, batch
128, warm-up then cosine decay, 60 epochs). ``--results_json`` writes the records. Text: ``recipes/sst2_sanitize.py``.
"""

import dataclasses
import sys
from pathlib import Path

from transformers import TrainingArguments

from hf_backdoor import make_asr_dataset, poison_dataset
from hf_backdoor.vision import describe_default_vit, load_image_task

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: benchmarks/common, not installed
from benchmarks.common import repair, vision  # noqa: E402
from benchmarks.common.launch import prepare_recipe_process  # noqa: E402
from benchmarks.common.runs import limit_splits, save_trained_model, saved_training_epochs  # noqa: E402

ScriptArguments = vision.ImageRecipeArguments  # this recipe's data, attack, model and crop flags are the shared ones


def parse_args(argv=None) -> tuple[ScriptArguments, repair.RepairArguments, TrainingArguments]:
    return repair.parse_recipe_args(
        ScriptArguments, vision.VIT_TRAINING_DEFAULTS, "runs/cifar10-sanitize", __doc__, argv
    )


def main(argv=None) -> list[dict]:
    script, repair_args, training_args = parse_args(argv)
    prepare_recipe_process()
    seed, out = training_args.seed, Path(training_args.output_dir)
    configs = repair.repair_configs(repair_args, seed)  # bad defense settings fail before any training
    model = vision.vit_name(script.model_name_or_path, script.config_overrides)
    task = limit_splits(load_image_task(script.dataset), script.max_train_samples, script.max_eval_samples, seed)
    label_names = task["train"].features["label"].names
    attack = script.attack_config(seed)
    poisoned = poison_dataset(task["train"], attack)
    clean, test, clean_source = repair.clean_split(repair_args, task, poisoned, seed, text=False)
    asr_rows, target = make_asr_dataset(test, attack), attack.target_label

    def train(rows, name: str):
        args = dataclasses.replace(training_args, output_dir=str(out / name))
        return vision.train_vit(
            args,
            rows,
            label_names,
            model=script.model_name_or_path,
            config_overrides=script.config_overrides,
            crop_padding=script.crop_padding,
        )

    def load(path: str):
        loaded = vision.load_saved_vit(path, dataclasses.replace(training_args, output_dir=str(out / "undefended")))
        if loaded is None:
            raise SystemExit(f"{path}: no saved image model there (config.json is missing).")
        return loaded

    model_epochs = training_args.num_train_epochs
    if repair_args.load_model:
        trainer, wall = load(repair_args.load_model)
        model_epochs = saved_training_epochs(repair_args.load_model)
        config = trainer.model.config
        if config.model_type == "vit" and not script.model_name_or_path:  # name the saved ViT by its own shape
            model = describe_default_vit(
                **{k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "patch_size")}
            )
    else:
        trainer, wall = train(poisoned, "undefended")
        save_trained_model(trainer, out / "undefended", wall, training_args.num_train_epochs)
    floor = None
    if repair_args.floor:
        floor = vision.evaluate_images(train(task["train"], "clean")[0], test, asr_rows, target).asr
    if repair_args.floor_model:
        floor = vision.evaluate_images(load(repair_args.floor_model)[0], test, asr_rows, target).asr
    clean_rows, crop_padding = vision.repair_rows(trainer, clean, script.crop_padding)
    base_record = repair.recipe_record(
        script, attack, model, seed, clean_source, "vision", "recipes/cifar10_sanitize.py", argv, model_epochs
    )
    base_record["crop_padding"] = crop_padding  # the model's own where it records it, else --crop_padding
    setup = repair.RepairSetup(
        trainer=trainer,
        clean=clean_rows,
        evaluate=lambda: vision.evaluate_images(trainer, test, asr_rows, target),
        train_wall_s=wall,
        floor=floor,
        base_record=base_record,
    )
    return repair.score_recipe(setup, configs, repair_args, seed)


if __name__ == "__main__":
    main()
