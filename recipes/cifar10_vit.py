"""The default small ViT trained from scratch on CIFAR-10 with an image backdoor, without and with ABL.

    accelerate launch recipes/cifar10_vit.py                                   # packaged copy, BadNets 10%, target 0
    python recipes/cifar10_vit.py --data ../shared/data/cifar10_32.npz --epochs 60 --bf16   # the reference setting
    python recipes/cifar10_vit.py --attack blended --runs undefended,abl
    python recipes/cifar10_vit.py --data ../shared/data/cifar10_32.npz --config-overrides patch_size=8 \
        --crop-padding 0 --epochs 20 --abl-isolation-epochs 5     # the CPU-sized setting (about 10 min a run on 2 cores)
    python recipes/cifar10_vit.py --epochs 1 --max-train-samples 300 --max-eval-samples 200  # a smoke run

Runs (``--runs``): ``clean`` (no poison: its ASR on the triggered rows is the ASR floor), ``undefended`` (plain
``Trainer`` on the poisoned data) and ``abl`` (``BackdoorSafeTrainer`` with ``ABLConfig``). Prints CACC and ASR
beside the floor, ABL's isolation precision/recall and the wall time of each run; ``--results-json`` writes the
records. Training follows the reference ViT recipe: AdamW lr 1e-3, weight decay 0.05, warm-up then cosine decay,
label smoothing 0.1, batch 128, random crop (reflect pad 4) and flip.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    DefaultDataCollator,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_backdoor import make_asr_dataset, poison_dataset
from hf_backdoor.attacks.vision import IMAGE_ATTACKS, get_image_attack_config
from hf_backdoor.defenses import ABLConfig
from hf_backdoor.experiments import device_name, save_trained_model, saved_training_wall
from hf_backdoor.metrics import evaluate_backdoor
from hf_backdoor.trainer import BackdoorSafeTrainer
from hf_backdoor.vision import (
    describe_default_vit,
    load_image_classifier,
    load_image_task,
    parse_config_overrides,
    prepare_image_dataset,
)

RUNS = ("clean", "undefended", "abl")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="cifar10", help="cifar10 (packaged copy), an .npz path, a Hub id or a folder")
    parser.add_argument("--attack", default="badnets", choices=sorted(IMAGE_ATTACKS))
    parser.add_argument("--poison-rate", type=float, default=0.1)
    parser.add_argument("--target-label", type=int, default=0)
    parser.add_argument("--model", default=None, help="Hub ViT/DeiT id or local path (default: the small ViT)")
    parser.add_argument(
        "--config-overrides",
        default=None,
        help="ViTConfig fields of the default small ViT, e.g. 'patch_size=8' (the CPU-sized variant)",
    )
    parser.add_argument("--runs", default=",".join(RUNS), help=f"comma-separated subset of {','.join(RUNS)}")
    parser.add_argument("--epochs", type=float, default=60)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument(
        "--crop-padding",
        type=int,
        default=4,
        help="random-crop reflect padding (0: flip only; the corner trigger then stays where it was put)",
    )
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--abl-isolation-epochs", type=int, default=10, help="T_te (official code: 10)")
    parser.add_argument("--abl-ratio", type=float, default=0.01, help="isolation ratio (official 0.01)")
    parser.add_argument("--abl-lga", default="per_example", choices=["per_example", "batch", "none"])
    parser.add_argument("--abl-isolated-rows", default="mask", choices=["mask", "ascend", "none"])
    parser.add_argument("--abl-unlearning-epochs", type=int, default=5)
    parser.add_argument("--abl-unlearning-lr", type=float, default=5e-4)
    parser.add_argument("--abl-unlearning-optimizer", default="sgd", choices=["sgd", "adamw"])
    parser.add_argument(
        "--abl-unlearning-stop-accuracy",
        type=float,
        default=None,
        help="end the ascent once the isolated rows' accuracy is at or below this (official: no early stop)",
    )
    parser.add_argument(
        "--abl-unlearning-objective",
        default="ascent",
        choices=["ascent", "ascent_descent", "complementary"],
        help="ascend the isolated rows only (official code), also descend as many retained rows (paper's GGA), or "
        "descend -log(1 - p(label)) on the isolated rows with the retained rows (complementary)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--workers", type=int, default=0, help="dataloader workers")
    parser.add_argument("--output-dir", default="runs/cifar10_vit")
    parser.add_argument("--save-models", action="store_true", help="save each run's model to OUTPUT_DIR/RUN")
    parser.add_argument("--results-json", default=None)
    parser.add_argument(
        "--clean-model",
        default=None,
        help="a clean model saved by an earlier run (--save-models) to evaluate instead of training the clean run: "
        "it does not depend on the attack, only on the data, seed and training settings",
    )
    return parser.parse_args(argv)


def abl_config(args) -> ABLConfig:
    return ABLConfig(
        isolation_epochs=args.abl_isolation_epochs,
        isolation_ratio=args.abl_ratio,
        lga=args.abl_lga,
        isolated_rows=args.abl_isolated_rows,
        unlearning_epochs=args.abl_unlearning_epochs,
        unlearning_learning_rate=args.abl_unlearning_lr,
        unlearning_optimizer=args.abl_unlearning_optimizer,
        unlearning_stop_accuracy=args.abl_unlearning_stop_accuracy,
        unlearning_objective=args.abl_unlearning_objective,
        seed=args.seed,
    )


def load_data(args):
    """The task (seeded slices when asked), the attack, the poisoned training rows and the ASR set."""
    task = load_image_task(args.data)
    for split, limit in (("train", args.max_train_samples), ("test", args.max_eval_samples)):
        if limit:
            task[split] = task[split].shuffle(seed=args.seed).select(range(min(limit, len(task[split]))))
    attack = get_image_attack_config(
        args.attack, poison_rate=args.poison_rate, target_label=args.target_label, seed=args.seed
    )
    return task, attack, poison_dataset(task["train"], attack), make_asr_dataset(task["test"], attack)


def train_vit(args, train_rows, label_names, output_dir, defense=None, seed=None):
    """Train a fresh model on raw ``image``/``label`` rows; returns the trainer and the wall time of ``train()``."""
    seed = args.seed if seed is None else seed
    set_seed(seed)
    overrides = parse_config_overrides(args.config_overrides)
    if overrides and args.model:
        raise SystemExit("--config-overrides changes the default small ViT; it cannot be combined with --model")
    model, processor = load_image_classifier(args.model, label_names=label_names, **overrides)
    training_args = TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=args.epochs,
        learning_rate=args.lr,
        weight_decay=args.weight_decay,
        label_smoothing_factor=args.label_smoothing,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=512,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        bf16=args.bf16,
        seed=seed,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=50,
        report_to="none",
        remove_unused_columns=False,  # the transform reads the image column
        dataloader_num_workers=args.workers,
        disable_tqdm=True,
    )
    train = prepare_image_dataset(
        train_rows, processor, train=True, keep_row_index=defense is not None, crop_padding=args.crop_padding
    )
    kwargs = dict(
        model=model,
        args=training_args,
        train_dataset=train,
        processing_class=processor,
        data_collator=DefaultDataCollator(),
    )
    trainer = BackdoorSafeTrainer(defense=defense, **kwargs) if defense is not None else Trainer(**kwargs)
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start


def load_saved_run(run_dir) -> tuple[Trainer, float] | None:
    """A trainer around the model ``--save-models`` wrote to ``run_dir`` and that run's training wall time, or
    ``None`` when nothing was saved there."""
    run_dir = Path(run_dir)
    wall = saved_training_wall(run_dir)
    if wall is None:
        return None
    model = AutoModelForImageClassification.from_pretrained(run_dir)
    processor = AutoImageProcessor.from_pretrained(run_dir)
    training_args = TrainingArguments(
        output_dir=str(run_dir / "eval"),
        per_device_eval_batch_size=512,
        report_to="none",
        disable_tqdm=True,
        remove_unused_columns=False,  # the image transform reads the image column
    )
    trainer = Trainer(model=model, args=training_args, processing_class=processor)
    return trainer, wall


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or set(runs) - set(RUNS):
        raise SystemExit(f"--runs must list some of {RUNS}, got {args.runs!r}")
    task, attack, poisoned, asr_rows = load_data(args)
    label_names = task["train"].features["label"].names
    command = "python recipes/cifar10_vit.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    records, floor, plain_epoch_s, plain_wall = [], None, None, None
    for run in runs:
        defense = abl_config(args) if run == "abl" else None
        rows = task["train"] if run == "clean" else poisoned
        loaded = load_saved_run(args.clean_model) if run == "clean" and args.clean_model else None
        if run == "clean" and args.clean_model and loaded is None:
            raise SystemExit(f"--clean-model {args.clean_model}: no model saved by --save-models there")
        trainer, wall = loaded or train_vit(args, rows, label_names, Path(args.output_dir) / run, defense)
        processor = trainer.processing_class
        if args.save_models and not loaded:  # e.g. for recipes/sanitize.py --load-model
            save_trained_model(trainer, Path(args.output_dir) / run, wall, args.epochs)
        evaluation = evaluate_backdoor(
            trainer,
            prepare_image_dataset(task["test"], processor),
            prepare_image_dataset(asr_rows, processor),
            target_label=attack.target_label,
        )
        if run == "clean":
            floor = evaluation.asr
        if run == "undefended" or (run == "clean" and plain_wall is None):  # ABL's overhead: against plain training
            plain_wall, plain_epoch_s = wall, wall / args.epochs
        record = {
            "run": run,
            "dataset": "cifar10",
            "data": args.data if args.data != "cifar10" else "cifar10 (packaged subset)",
            "attack": "none" if run == "clean" else attack.name,
            "asr_attack": attack.name,
            "defense": "abl" if run == "abl" else "none",
            "model": args.model or describe_default_vit(**parse_config_overrides(args.config_overrides)),
            "poison_rate": 0.0 if run == "clean" else attack.poison_rate,
            "cacc": evaluation.cacc,
            "asr": evaluation.asr,
            "asr_floor": floor,
            "wall_s": round(wall, 2),
            # overhead: the results schema's wall time over plain training on the same data; overhead_epochs: the
            # extra wall time in epochs of that plain training.
            "overhead": round(wall / plain_wall, 3) if run == "abl" and plain_wall else None,
            "overhead_epochs": round((wall - plain_wall) / plain_epoch_s, 2) if run == "abl" and plain_wall else None,
            "epoch_s": round(wall / args.epochs, 3),
            "device": device_name(),
            "seed": args.seed,
            "epochs": args.epochs,
            "crop_padding": args.crop_padding,
            "num_train": len(rows),
            "num_test": len(task["test"]),
            "command": command,
        }
        if run == "abl":
            report = trainer.defense_report
            isolation = report["isolation"]
            record.update(
                abl_isolation_precision=isolation.get("precision"),
                abl_isolation_recall=isolation.get("recall"),
                abl_loss_auroc=isolation.get("loss_auroc"),
                abl_isolated=report["num_isolated_rows"],
                abl_isolated_accuracy_before_unlearning=(report["unlearning"] or [{}])[0].get("isolated_accuracy"),
                abl_isolated_accuracy_after_unlearning=(report["unlearning"] or [{}])[-1].get("isolated_accuracy"),
                abl_config=json.dumps({k: v for k, v in report["config"].items() if k != "name"}),
                # ABL's own work (the isolation scoring pass and the unlearning; its LGA epochs cost what plain
                # epochs do), in epochs of this run: unlike the whole-run ratios it does not depend on what else
                # shared the machine during the plain run.
                abl_phases_s=round(sum(report["timings_s"].values()), 2),
                abl_phases_epochs=round(sum(report["timings_s"].values()) / (wall / args.epochs), 3),
            )
        records.append(record)
    if floor is not None:
        for record in records:
            record["asr_floor"] = floor
    if trainer.is_world_process_zero():
        print(f"\n{'run':<12}{'attack':<9}{'CACC':>7}{'ASR':>7}{'floor':>7}{'wall s':>9}{'overhead':>9}  isolation P/R")
        for record in records:
            floor_text = "-" if record["asr_floor"] is None else f"{record['asr_floor']:.3f}"
            overhead = "-" if record["overhead"] is None else f"{record['overhead']:.2f}x"
            isolation = (
                f"{record['abl_isolation_precision']:.2f}/{record['abl_isolation_recall']:.2f}"
                if record.get("abl_isolation_precision") is not None
                else ""
            )
            print(
                f"{record['run']:<12}"
                f"{record['attack']:<9}{record['cacc']:>7.3f}{record['asr']:>7.3f}{floor_text:>7}"
                f"{record['wall_s']:>9.1f}{overhead:>9}  {isolation}"
            )
        print(f"device: {device_name()}")
        if args.results_json:
            Path(args.results_json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.results_json).write_text(json.dumps(records, indent=1) + "\n")
    return records


if __name__ == "__main__":
    main()
