"""Small-ViT configs side by side on this machine: parameters, seconds per epoch, clean accuracy by epoch, and the
BadNets ASR the same config reaches (issue: "a stronger CPU default for 32 px").

    python benchmarks/vit_configs.py --configs "hidden_size=128,num_attention_heads=4,num_hidden_layers=4,intermediate_size=512" --epochs 30 --batch-size 64
    python benchmarks/vit_configs.py --configs "patch_size=8" --epochs 20                 # the former CPU-sized ViT
    python benchmarks/vit_configs.py --configs "<config>" --attack badnet --epochs 30     # the backdoor it learns
    python benchmarks/vit_configs.py --configs "num_hidden_layers=1" --epochs 1 --max-train-samples 256 --no-save
    python benchmarks/vit_configs.py --configs cpu --epochs 45 --batch-size 64 --bf16   # under bf16 autocast
    python benchmarks/vit_configs.py --configs cpu --epochs 45 --batch-size 64 --compile   # torch.compile'd

Each config (``;``-separated ``ViTConfig`` overrides of the default small ViT; ``default`` for none) is trained with
the reference ViT recipe (``benchmarks/common/vision.py``: AdamW, weight decay 0.05, 10% warm-up then cosine decay,
label smoothing 0.1, random crop with reflect padding 4 and flip) at ``--lr``/``--batch-size``/``--epochs``, on the
reference CIFAR-10 subset (``../shared/data/cifar10_32.npz``: 10,000 training and 2,000 test images; the packaged
copy when that file is absent). The clean accuracy is measured every ``--eval-every`` epochs (its time is not counted
in ``wall_s``). Every trained model goes into the model zoo (:mod:`hf_backdoor.zoo`, ``$HF_BACKDOOR_CACHE``), keyed
by its full config, so a second call with the same settings only evaluates; the zoo is an optimisation: without it
the models are trained again.

A clean run's ``asr`` is its ASR on the BadNets-triggered test rows: the ASR floor of that config. An attacked run
takes its floor from a clean record of the same config, epochs, batch, lr and seed in ``--output`` when there is one.
``within_budget`` says whether training took at most ``--budget-min`` minutes. Records merge into
``benchmarks/results/vit_configs.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification, Trainer, TrainingArguments

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/common is not installed

from benchmarks.common import records  # noqa: E402
from benchmarks.common.launch import device_defaults  # noqa: E402
from benchmarks.common.runs import limit_splits  # noqa: E402
from benchmarks.common.vision import VIT_TRAINING_DEFAULTS, evaluate_images, train_vit  # noqa: E402
from hf_backdoor import make_asr_dataset, poison_dataset  # noqa: E402
from hf_backdoor.attacks import get_image_attack_config  # noqa: E402
from hf_backdoor.vision import describe_default_vit, load_image_task, parse_config_overrides  # noqa: E402
from hf_backdoor.zoo import TrainedModel, ZooConfig, train_or_load  # noqa: E402

SHARED_NPZ = ROOT.parent / "shared" / "data" / "cifar10_32.npz"
RESULTS = ROOT / "benchmarks" / "results" / "vit_configs.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default="default", help="';'-separated ViTConfig overrides, 'default' for none")
    parser.add_argument("--data", default=str(SHARED_NPZ) if SHARED_NPZ.exists() else "cifar10")
    parser.add_argument("--attack", default="none", help="none (clean) or an image attack (badnet, blended, ...)")
    parser.add_argument("--poison-rate", type=float, default=0.1)
    parser.add_argument("--target-label", type=int, default=0)
    parser.add_argument(
        "--attack-kwargs",
        default=None,
        help='JSON of the attack config\'s other fields, e.g. \'{"s": 1.0, "cross_ratio": 0}\' for WaNet (keys the zoo)',
    )
    parser.add_argument("--epochs", type=float, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--crop-padding", type=int, default=4)
    parser.add_argument("--eval-every", type=float, default=5, help="epochs between clean-accuracy measurements")
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--bf16", action="store_true", help="train under bf16 autocast (a speed lever where the CPU has bf16 kernels)"
    )
    parser.add_argument(
        "--compile", action="store_true", help="train the torch.compile'd model (TrainingArguments.torch_compile)"
    )
    parser.add_argument("--budget-min", type=float, default=25.0, help="the training-time budget the table checks")
    parser.add_argument("--no-cache", action="store_true", help="train without reading or writing the model zoo")
    parser.add_argument("--output-dir", default="/tmp/vit_configs")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--no-save", action="store_true", help="print the table without writing records")
    return parser.parse_args(argv)


def _speed_levers(args) -> dict:
    """The speed levers turned on, as ``TrainingArguments`` fields: what training gets and what keys the zoo entry.
    Only the ones that are on, so the fp32 eager models already in the zoo keep their keys."""
    return {**({"bf16": True} if args.bf16 else {}), **({"torch_compile": True} if args.compile else {})}


def _train_fn(args, rows, test, label_names, overrides: dict, out_dir: Path):
    def train(config: ZooConfig) -> TrainedModel:
        steps_per_epoch = -(-len(rows) // config.batch_size)
        training_args = TrainingArguments(
            output_dir=str(out_dir),
            **{
                **VIT_TRAINING_DEFAULTS,
                "learning_rate": config.learning_rate,
                "num_train_epochs": config.epochs,
                "per_device_train_batch_size": config.batch_size,
                "seed": config.seed,
                "eval_strategy": "steps",
                "eval_steps": max(1, round(args.eval_every * steps_per_epoch)),
                **_speed_levers(args),
                **(device_defaults() if args.bf16 else {}),  # bf16 on a CPU-only machine needs use_cpu
            },
        )
        trainer, wall = train_vit(
            training_args,
            rows,
            label_names,
            config_overrides=",".join(f"{k}={v}" for k, v in overrides.items()) or None,
            crop_padding=args.crop_padding,
            eval_dataset=test,
        )
        curve, eval_s = {}, 0.0
        for log in trainer.state.log_history:
            if "eval_accuracy" in log:
                curve[f"{log['epoch']:.1f}"] = round(log["eval_accuracy"], 4)
                eval_s += log.get("eval_runtime", 0.0)
        return TrainedModel(
            trainer.model, trainer.processing_class, {"wall_s": wall - eval_s, "eval_s": eval_s, "cacc_curve": curve}
        )

    return train


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    task = limit_splits(load_image_task(args.data), args.max_train_samples, args.max_eval_samples, args.seed)
    label_names = task["train"].features["label"].names
    badnet = get_image_attack_config(
        "badnet", poison_rate=args.poison_rate, target_label=args.target_label, seed=args.seed
    )
    attack_kwargs = json.loads(args.attack_kwargs) if args.attack_kwargs else {}
    attack = None if args.attack == "none" else get_image_attack_config(
        args.attack, poison_rate=args.poison_rate, target_label=args.target_label, seed=args.seed, **attack_kwargs
    )  # fmt: skip
    rows = task["train"] if attack is None else poison_dataset(task["train"], attack)
    asr_attack = attack or badnet
    asr_rows = make_asr_dataset(task["test"], asr_attack)
    command = "python " + shlex.join(["benchmarks/vit_configs.py", *(sys.argv[1:] if argv is None else argv)])
    existing = json.loads(Path(args.output).read_text()) if Path(args.output).exists() else []
    new = []
    for spec in [c.strip() for c in args.configs.split(";") if c.strip()]:
        overrides = {} if spec == "default" else parse_config_overrides(spec)
        zoo_config = ZooConfig(
            task=f"{Path(args.data).name}[train:{args.max_train_samples or 'all'}]",
            model="vit-small-32",
            epochs=args.epochs,
            learning_rate=args.lr,
            batch_size=args.batch_size,
            attack="none" if attack is None else attack.name,
            attack_config={} if attack is None else dataclasses.asdict(attack),
            poison_rate=0.0 if attack is None else attack.poison_rate,
            seed=args.seed,
            model_config=overrides,
            training={
                **{k: v for k, v in VIT_TRAINING_DEFAULTS.items() if k not in ("disable_tqdm", "num_train_epochs")},
                "crop_padding": args.crop_padding,
                **_speed_levers(args),
            },
        )
        out_dir = Path(args.output_dir) / f"{spec.replace(',', '_').replace('=', '')}_{zoo_config.attack}"
        train_fn = _train_fn(args, rows, task["test"], label_names, overrides, out_dir)
        model_dir, info = train_or_load(
            zoo_config, train_fn, use_cache=not args.no_cache, output_dir=out_dir / "model" if args.no_cache else None
        )
        model = AutoModelForImageClassification.from_pretrained(model_dir)
        evaluator = Trainer(
            model=model,
            args=TrainingArguments(
                output_dir=str(out_dir / "eval"),
                per_device_eval_batch_size=512,
                remove_unused_columns=False,
                report_to="none",
            ),
            processing_class=AutoImageProcessor.from_pretrained(model_dir),
        )
        evaluation = evaluate_images(evaluator, task["test"], asr_rows, asr_attack.target_label)
        params = sum(p.numel() for p in model.parameters())
        wall = float(info["wall_s"])
        record = {
            "dataset": "cifar10",
            "data": Path(args.data).name,
            "attack": "none" if attack is None else attack.name,
            "asr_attack": asr_attack.name,
            "defense": "none",
            "model": describe_default_vit(**overrides),
            "config_overrides": spec,
            "model_config": overrides,
            "params_m": round(params / 1e6, 3),
            "poison_rate": 0.0 if attack is None else attack.poison_rate,
            "cacc": evaluation.cacc,
            "asr": evaluation.asr,
            "asr_floor": evaluation.asr if attack is None else None,
            "cacc_curve": info.get("info", {}).get("cacc_curve"),
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "learning_rate": args.lr,
            "bf16": args.bf16,
            "torch_compile": args.compile,
            "wall_s": round(wall, 1),
            "epoch_s": round(wall / args.epochs, 2),
            "within_budget": wall <= args.budget_min * 60,
            "overhead": 1.0,
            "num_train": len(rows),
            "num_test": len(task["test"]),
            "device": records.device_name(),
            "seed": args.seed,
            "attack_kwargs": attack_kwargs or None,
            "zoo_key": info.get("key"),
            "from_cache": info.get("from_cache"),
            "command": command,
        }
        if attack is not None:
            clean = [r for r in existing + new if r["attack"] == "none" and _same_run(r, record)]
            record["asr_floor"] = clean[-1]["asr"] if clean else None
        new.append(record)
        print(
            f"[{spec}] {record['params_m']}M params  {record['epoch_s']} s/epoch  CACC {record['cacc']:.3f}  "
            f"ASR {record['asr']:.3f}  curve {record['cacc_curve']}",
            flush=True,
        )
    _print_table(new, args.budget_min)
    if not args.no_save:
        merged = [r for r in existing if not any(_same_record(r, n) for n in new)] + new
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(merged, indent=1) + "\n")
        print(f"wrote {args.output}")
    return new


def _same_run(a: dict, b: dict) -> bool:
    """Same data, architecture (``cpu`` and its spelled-out fields are one) and training."""
    keys = ("data", "model_config", "epochs", "batch_size", "learning_rate", "seed", "num_train")
    return all(a.get(k) == b.get(k) for k in keys) and all(
        a.get(flag, False) == b.get(flag, False) for flag in ("bf16", "torch_compile")
    )


def _same_record(a: dict, b: dict) -> bool:
    return (
        _same_run(a, b)
        and a["attack"] == b["attack"]
        and a["poison_rate"] == b["poison_rate"]
        and a.get("attack_kwargs") == b.get("attack_kwargs")
    )


def _print_table(rows: list[dict], budget_min: float) -> None:
    print(f"\n{'config':<62}{'params':>8}{'s/ep':>7}{'epochs':>7}{'min':>6}{'CACC':>7}{'ASR':>7}{'floor':>7}")
    for r in rows:
        floor = "-" if r["asr_floor"] is None else f"{r['asr_floor']:.3f}"
        fits = "" if r["within_budget"] else f"  (over {budget_min:g} min)"
        print(
            f"{r['config_overrides'][:60]:<62}{r['params_m']:>7.2f}M{r['epoch_s']:>7.1f}{r['epochs']:>7g}"
            f"{r['wall_s'] / 60:>6.1f}{r['cacc']:>7.3f}{r['asr']:>7.3f}{floor:>7}{fits}"
        )


if __name__ == "__main__":
    main()
