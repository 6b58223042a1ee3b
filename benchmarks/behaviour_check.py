"""Behaviour check for refactors: three small seeded cells whose CACC / ASR must not move.

    OMP_NUM_THREADS=1 python benchmarks/behaviour_check.py --output benchmarks/results/behaviour_check/after.json \
        --compare benchmarks/results/behaviour_check/before.json

Cells (CPU, one thread, deterministic; about 6.5 minutes of CPU time in all, more wall time on shared cores):

1. ``text_btu``: SST-2 (packaged), BadNet dirty-label 10% target 1 with one trigger word (``cf``: with the default
   five, each word is in 16 of the 800 rows and two epochs plant no backdoor for BTU to find), the packaged MiniLM-L6,
   ``BackdoorSafeTrainer`` with ``BTUConfig()``, 800 training rows, 2 epochs, lr 1e-4, batch 32, max length 128 (the
   README's BTU recipe, shorter); CACC on 300 clean test rows, ASR on 300 ASR rows; BTU's flagged tokens.
2. ``vit_abl``: the packaged CIFAR-10 subset, image BadNets 10% target 0 with a 5x5 corner patch, the default small
   ViT with patch 8 (the README's CPU-sized setting), 600 training images, 20 epochs of recipes/cifar10_vit.py's
   recipe at batch 32, flip-only augmentation, ``ABLConfig`` with batch LGA, isolation of 5% after 6 epochs and
   ascent unlearning until no isolated row keeps its label; CACC / ASR on 200 test images.
3. ``text_sanitize``: an undefended MiniLM (``BackdoorSafeTrainer(defense=None)``) trained on cell 1's poisoned
   slice, repaired with ``trainer.sanitize(200 clean validation rows, RNPConfig(...))`` (5 recovery epochs);
   CACC / ASR before and after.

Only the public API of ``hf_backdoor`` and ``hf_backdoor.vision`` is used, so the script runs unchanged against the
package before and after a refactor. ``--output`` writes the numbers as JSON; ``--compare OLD.json`` checks every
number against an earlier output (wall times excepted) and exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import DataCollatorWithPadding, DefaultDataCollator, TrainingArguments, set_seed

import hf_backdoor
from hf_backdoor import (
    ABLConfig,
    BackdoorSafeTrainer,
    BadNetConfig,
    BTUConfig,
    ImageBadNetsConfig,
    RNPConfig,
    default_text_model,
    load_task,
    load_text_classifier,
    make_asr_dataset,
    poison_dataset,
    tokenize_dataset,
)
from hf_backdoor.vision import load_image_classifier, load_image_task, prepare_image_dataset

SEED = 0
CELLS = ("text_btu", "vit_abl", "text_sanitize")

# Text: the README's BTU recipe (lr 1e-4, batch 32, max length 128, 6% warm-up, wd 0.01), shortened.
TEXT_TRAIN_ROWS = 800
TEXT_TEST_ROWS = 300
TEXT_ASR_ROWS = 300
TEXT_CLEAN_ROWS = 200
TEXT_EPOCHS = 2
TEXT_LR = 1e-4
TEXT_BATCH = 32
MAX_LENGTH = 128
# One BadNet word (the default draws from five): with five, each word is in 16 of the 800 rows and two epochs do
# not plant the backdoor, so BTU would have nothing to flag.
TEXT_TRIGGERS = ("cf",)

# Vision: recipes/cifar10_vit.py's training recipe (AdamW lr 1e-3, wd 0.05, label smoothing 0.1, warm-up + cosine),
# the CPU-sized ViT (patch 8) and flip-only augmentation, on 600 images with batch 32 so a few epochs take steps.
VIT_TRAIN_ROWS = 600
VIT_TEST_ROWS = 200
VIT_EPOCHS = 20
VIT_BATCH = 32
VIT_LR = 1e-3
VIT_OVERRIDES = {"patch_size": 8}
# A 5x5 corner patch (the default is 3x3): learnt within the isolation epochs on 600 images, so ABL isolates
# poisoned rows and its unlearning has a backdoor to remove.
VIT_TRIGGER_PATCH = 5
ABL = dict(
    isolation_epochs=6,
    isolation_ratio=0.05,
    lga="batch",
    unlearning_epochs=20,
    unlearning_stop_accuracy=0.0,
    seed=SEED,
)
# RNP, small: fewer recovery epochs than the official 20, the FFN and LayerNorm units (the recipe's default).
RNP = dict(units=("ffn", "layernorm"), recovering_epochs=5, batch_size=64, seed=SEED)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    parser.add_argument("--compare", default=None, help="an earlier --output: exit 1 if any number differs")
    parser.add_argument("--cells", default=",".join(CELLS), help=f"comma-separated subset of {','.join(CELLS)}")
    parser.add_argument("--work-dir", default=None, help="output dirs of the runs (default: a temp dir, removed)")
    return parser.parse_args(argv)


def check_args(output_dir: Path, **training) -> TrainingArguments:
    """The ``TrainingArguments`` of a cell: its ``training`` settings, seeded (weights and data order), on the CPU,
    with no checkpoint, evaluation loop, log line or progress bar."""
    return TrainingArguments(
        output_dir=str(output_dir),
        seed=SEED,
        data_seed=SEED,
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1000,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        **training,
    )


def text_args(output_dir: Path) -> TrainingArguments:
    return check_args(
        output_dir,
        learning_rate=TEXT_LR,
        num_train_epochs=TEXT_EPOCHS,
        per_device_train_batch_size=TEXT_BATCH,
        per_device_eval_batch_size=128,
        warmup_steps=0.06,
        weight_decay=0.01,
    )


def text_data():
    """The SST-2 slices shared by cells 1 and 3 (raw rows; tokenized by the caller)."""
    task = load_task("sst2")
    attack = BadNetConfig(poison_rate=0.1, target_label=1, mode="dirty", seed=SEED, triggers=TEXT_TRIGGERS)
    train = task["train"].shuffle(seed=SEED).select(range(TEXT_TRAIN_ROWS))
    test = task["test"].shuffle(seed=SEED).select(range(TEXT_TEST_ROWS))
    asr = make_asr_dataset(task["test"], attack)
    asr = asr.shuffle(seed=SEED).select(range(min(TEXT_ASR_ROWS, len(asr))))
    clean = task["validation"].shuffle(seed=SEED).select(range(TEXT_CLEAN_ROWS))
    return task, attack, train, test, asr, clean


def train_text(work: Path, name: str, defense):
    task, attack, train, test, asr, clean = text_data()
    set_seed(SEED)
    model, tokenizer = load_text_classifier(default_text_model(), task["train"].features["label"].names)
    poisoned = poison_dataset(train, attack, tokenizer=tokenizer)
    trainer = BackdoorSafeTrainer(
        model=model,
        args=text_args(work / name),
        train_dataset=tokenize_dataset(poisoned, tokenizer, MAX_LENGTH),
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        defense=defense,
    )
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    sets = {
        "test": tokenize_dataset(test, tokenizer, MAX_LENGTH),
        "asr": tokenize_dataset(asr, tokenizer, MAX_LENGTH),
        "clean": tokenize_dataset(clean, tokenizer, MAX_LENGTH),
    }
    return trainer, sets, attack, int(np.sum(poisoned["poisoned"])), train_s


def scores(evaluation: dict) -> dict:
    return {"cacc": round(float(evaluation["cacc"]), 6), "asr": round(float(evaluation["asr"]), 6)}


def cell_text_btu(work: Path) -> dict:
    start = time.perf_counter()
    trainer, sets, attack, num_poisoned, train_s = train_text(work, "text_btu", BTUConfig())
    result = scores(trainer.evaluate_backdoor(sets["test"], sets["asr"], target_label=attack.target_label))
    report = trainer.defense_report
    return {
        "cell": "text_btu",
        **result,
        "flagged_tokens": sorted(report["flagged_tokens"]),
        "num_candidates": len(report["candidate_ids"]),
        "num_isolated_rows": int(report["num_isolated_rows"]),
        "num_train": TEXT_TRAIN_ROWS,
        "num_poisoned": num_poisoned,
        "num_test": len(sets["test"]),
        "num_asr": len(sets["asr"]),
        "timing": {"train_s": round(train_s, 1), "wall_s": round(time.perf_counter() - start, 1)},
    }


def cell_text_sanitize(work: Path) -> dict:
    start = time.perf_counter()
    trainer, sets, attack, num_poisoned, train_s = train_text(work, "text_undefended", None)
    before = scores(trainer.evaluate_backdoor(sets["test"], sets["asr"], target_label=attack.target_label))
    set_seed(SEED)
    sanitize_start = time.perf_counter()
    _, report = trainer.sanitize(sets["clean"], RNPConfig(**RNP))
    sanitize_s = time.perf_counter() - sanitize_start
    after = scores(trainer.evaluate_backdoor(sets["test"], sets["asr"], target_label=attack.target_label))
    return {
        "cell": "text_sanitize",
        **after,
        "cacc_before": before["cacc"],
        "asr_before": before["asr"],
        "rnp_prune_threshold": report.get("prune_threshold"),
        "rnp_num_pruned": report.get("num_pruned"),
        "rnp_num_units": report.get("num_units"),
        "rnp_unlearning_epochs": report.get("unlearning_epochs"),
        "holdout_accuracy_before": _round(report.get("holdout_accuracy_before")),
        "holdout_accuracy_after": _round(report.get("holdout_accuracy_after")),
        "num_clean": len(sets["clean"]),
        "num_poisoned": num_poisoned,
        "timing": {
            "train_s": round(train_s, 1),
            "sanitize_s": round(sanitize_s, 1),
            "wall_s": round(time.perf_counter() - start, 1),
        },
    }


def cell_vit_abl(work: Path) -> dict:
    start = time.perf_counter()
    task = load_image_task("cifar10")
    train = task["train"].shuffle(seed=SEED).select(range(VIT_TRAIN_ROWS))
    test = task["test"].shuffle(seed=SEED).select(range(VIT_TEST_ROWS))
    attack = ImageBadNetsConfig(poison_rate=0.1, target_label=0, seed=SEED, patch_size=VIT_TRIGGER_PATCH)
    poisoned = poison_dataset(train, attack)
    asr = make_asr_dataset(test, attack)
    label_names = task["train"].features["label"].names
    set_seed(SEED)
    model, processor = load_image_classifier(None, label_names, **VIT_OVERRIDES)
    prepare_kwargs = {"train": True, "crop_padding": 0}
    if "keep_row_index" in inspect.signature(prepare_image_dataset).parameters:
        prepare_kwargs["keep_row_index"] = True
    args = check_args(
        work / "vit_abl",
        num_train_epochs=VIT_EPOCHS,
        learning_rate=VIT_LR,
        weight_decay=0.05,
        label_smoothing_factor=0.1,
        per_device_train_batch_size=VIT_BATCH,
        per_device_eval_batch_size=256,
        lr_scheduler_type="cosine",
        warmup_steps=0.1,
        remove_unused_columns=False,  # the image transform reads the image column
        dataloader_num_workers=0,
    )
    trainer = BackdoorSafeTrainer(
        model=model,
        args=args,
        train_dataset=prepare_image_dataset(poisoned, processor, **prepare_kwargs),
        processing_class=processor,
        data_collator=DefaultDataCollator(),
        defense=ABLConfig(**ABL),
    )
    train_start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - train_start
    result = scores(
        trainer.evaluate_backdoor(
            prepare_image_dataset(test, processor),
            prepare_image_dataset(asr, processor),
            target_label=attack.target_label,
        )
    )
    report = trainer.defense_report
    isolation = report.get("isolation", {})
    unlearning = report.get("unlearning") or [{}]
    return {
        "cell": "vit_abl",
        **result,
        "num_isolated_rows": int(report["num_isolated_rows"]),
        "isolation_epoch": report.get("isolation_epoch"),
        "isolation_precision": _round(isolation.get("precision")),
        "isolation_recall": _round(isolation.get("recall")),
        "isolation_loss_auroc": _round(isolation.get("loss_auroc")),
        "unlearning_epochs_run": len(unlearning) - 1,
        "isolated_accuracy_before_unlearning": _round(unlearning[0].get("isolated_accuracy")),
        "isolated_accuracy_after_unlearning": _round(unlearning[-1].get("isolated_accuracy")),
        "num_train": VIT_TRAIN_ROWS,
        "num_poisoned": int(np.sum(poisoned.with_format(None)["poisoned"])),
        "num_test": len(test),
        "num_asr": len(asr),
        "timing": {"train_s": round(train_s, 1), "wall_s": round(time.perf_counter() - start, 1)},
    }


def _round(value, digits: int = 6):
    return None if value is None else round(float(value), digits)


def compare(new: dict, old: dict) -> list[str]:
    """Every difference between two outputs' cells, wall times excepted."""
    diffs = []
    old_cells = {c["cell"]: c for c in old["cells"]}
    for cell in new["cells"]:
        previous = old_cells.get(cell["cell"])
        if previous is None:
            diffs.append(f"{cell['cell']}: not in the earlier output")
            continue
        for key in sorted(set(cell) | set(previous)):
            if key == "timing":
                continue
            if cell.get(key) != previous.get(key):
                diffs.append(f"{cell['cell']}.{key}: {previous.get(key)!r} -> {cell.get(key)!r}")
    return diffs


def main(argv=None) -> int:
    args = parse_args(argv)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    if not cells or set(cells) - set(CELLS):
        raise SystemExit(f"--cells must list some of {CELLS}, got {args.cells!r}")
    torch.set_num_threads(1)
    try:
        torch.use_deterministic_algorithms(True, warn_only=True)
    except AttributeError:
        pass
    transformers.logging.set_verbosity_error()
    print(f"hf_backdoor: {hf_backdoor.__file__}")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, threads {torch.get_num_threads()}, "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    runners = {"text_btu": cell_text_btu, "vit_abl": cell_vit_abl, "text_sanitize": cell_text_sanitize}
    start = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory(prefix="behaviour_check_") as tmp:
        work = Path(args.work_dir or tmp)
        for name in cells:
            results.append(runners[name](work))
            print(f"[{name}] done: {json.dumps(results[-1])}", flush=True)
    wall = time.perf_counter() - start

    print(f"\n{'cell':<15}{'CACC':>8}{'ASR':>8}{'before':>16}  details")
    for r in results:
        before = f"{r['cacc_before']:.3f}/{r['asr_before']:.3f}" if "cacc_before" in r else "-"
        if r["cell"] == "text_btu":
            details = f"flagged {' '.join(r['flagged_tokens']) or '(none)'}; {r['num_isolated_rows']} rows isolated"
        elif r["cell"] == "vit_abl":
            details = (
                f"isolated {r['num_isolated_rows']} (P {r['isolation_precision']}, R {r['isolation_recall']}), "
                f"unlearning {r['unlearning_epochs_run']} ep, isolated acc {r['isolated_accuracy_before_unlearning']}"
                f" -> {r['isolated_accuracy_after_unlearning']}"
            )
        else:
            details = f"RNP pruned {r['rnp_num_pruned']}/{r['rnp_num_units']} at mask <= {r['rnp_prune_threshold']}"
        print(f"{r['cell']:<15}{r['cacc']:>8.3f}{r['asr']:>8.3f}{before:>16}  {details}")
    print("wall (s): " + ", ".join(f"{r['cell']} {r['timing']['wall_s']}" for r in results) + f"; total {wall:.1f}")

    output = {
        "hf_backdoor_file": hf_backdoor.__file__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "command": "python " + " ".join(["benchmarks/behaviour_check.py", *(sys.argv[1:] if argv is None else argv)]),
        "wall_s": round(wall, 1),
        "cells": results,
    }
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(output, indent=1) + "\n")
        print(f"wrote {args.output}")
    if args.compare:
        diffs = compare(output, json.loads(Path(args.compare).read_text()))
        if diffs:
            print(f"DIFFERENT from {args.compare}:")
            for line in diffs:
                print("  " + line)
            return 1
        print(f"identical to {args.compare} (every number; wall times excepted)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
