"""Training throughput of the CPU speed levers, for the default text model (MiniLM-L6) and the CPU-sized ViT.

    python benchmarks/speed_levers.py --threads 1 --fresh-compile-cache   # every lever; mostly compiling when cold
    python benchmarks/speed_levers.py --quick          # fp32, bf16, the other thread count, PIL: no compile, no Trainer
    python benchmarks/speed_levers.py --models vision --levers bf16 --rounds 12 --vision-steps-per-window 4
    python benchmarks/speed_levers.py --models text --levers trainer --trainer-steps 48 --text-eval-rows 512

What is timed is one training step as the Trainer runs it: build the batch, forward, loss, backward, gradient clipping
at 1.0 and a fused AdamW step (the Trainer's default optimizer), on real rows (SST-2 batches of 32 padded per batch
as DataCollatorWithPadding does; packaged CIFAR-10 batches of 128 with the recipe's random crop (reflect padding 4)
and flip). Levers, each a separate copy of the same initial model:

- ``fp32``: the baseline (eager, float32, ``--threads`` threads, images pre-decoded into one uint8 tensor);
- ``bf16``: ``torch.autocast("cpu", dtype=torch.bfloat16)`` around forward and loss (what ``bf16=True`` does in
  ``TrainingArguments`` on a CPU); weights, gradients and the optimizer stay float32;
- ``compile`` / ``compile_bf16``: ``torch.compile(model)`` in its default mode (what ``torch_compile=True`` does),
  float32 or under bf16 autocast; ``compile_s`` is the extra wall time of the warm-up steps over steady steps, and
  ``compile_cache`` counts inductor's FX graph cache hits and misses (``--fresh-compile-cache`` starts from an empty
  cache: the cost of a first run; without it, a repeated run reuses what an earlier one compiled);
- ``other_threads`` / ``other_threads_bf16``: ``torch.set_num_threads(1)`` when ``--threads`` is more than 1, else
  2 (fp32 and bf16; the ``threads`` column says which);
- vision only: ``channels_last`` (model and images in channels-last memory format), ``pil_per_step`` (today's path:
  the ``datasets`` Image column decoded from PNG with PIL and run through the image processor at every step, via
  ``prepare_image_dataset(train=True)`` and ``DefaultDataCollator``, as the Trainer's DataLoader calls them) and
  ``float_tensor`` (images pre-decoded and normalised into one float32 tensor; only crop and flip per step);
- text only: ``trainer``, a real ``transformers.Trainer`` loop with ``bf16=True`` against ``bf16=False``
  (``--trainer-steps`` steps each, ``--trainer-pairs`` pairs of runs ordered fp32, bf16, fp32, bf16 ...; step time =
  time between ``on_step_end`` callbacks, the first interval dropped).

The ViT's only convolution is its patch embedding, so ``channels_last`` can only change that layer.

Contention: the cores are shared with other jobs, so the variants are interleaved: every round runs one window
(``--*-steps-per-window`` steps) of every variant, in forward order on even rounds and reverse order on odd ones, so
contention hits them equally. ``samples_per_s`` is the median over windows; ``ratio_to_fp32`` is the median over
rounds of the window's rate divided by the fp32 baseline's rate in the same round; ``load_avg`` is the mean 1-minute
load average (``os.getloadavg()``) at the end of the variant's windows (each window's is kept too).

Accuracy: every variant of a model sees the same batches in the same order from the same initial weights (each step
reseeds torch's generator, so augmentation and dropout draw the same), so ``loss_after_steps`` of the fp32 and bf16
variants compare like for like; ``eval_accuracy`` scores the fp32 and bf16 models (float32 inference) on held-out
rows, and ``eval_agreement_with_fp32`` is the share of those rows where the bf16 model predicts what the fp32 one
does. The pre-decoded image paths give exactly the pixels of the PIL path (checked at start), so their losses equal
the fp32 baseline's.

Records (flat, one per lever) are merged into ``benchmarks/results/speed_levers.json``: a record with the same
benchmark, model, lever, dtype, threads, mode (quick or full) and number of steps replaces the older one.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root: benchmarks/common, not installed
from benchmarks.common.records import RESULTS, command_line, cpu_description, merge_records  # noqa: E402

SEED = 0
TEXT_BATCH, VISION_BATCH = 32, 128
TEXT_LR, VISION_LR = 1e-4, 1e-3  # the reference trainings (benchmarks/common/runs.py, vision.py)
TEXT_WEIGHT_DECAY, VISION_WEIGHT_DECAY = 0.01, 0.05
MAX_GRAD_NORM = 1.0  # TrainingArguments' default, applied by the Trainer at every step
CROP_PADDING = 4  # the image recipe's default augmentation
VIT_OVERRIDES = {"patch_size": 8}  # the CPU-sized ViT of the README's measurements
TEXT_LEVERS = ("fp32", "bf16", "compile", "compile_bf16", "other_threads", "other_threads_bf16", "trainer")
VISION_LEVERS = (
    "fp32",
    "bf16",
    "compile",
    "compile_bf16",
    "other_threads",
    "other_threads_bf16",
    "channels_last",
    "pil_per_step",
    "float_tensor",
)
QUICK_LEVERS = ("fp32", "bf16", "other_threads", "pil_per_step")


@dataclass
class Variant:
    """One lever: its own copy of the model and optimizer, and what its windows measured."""

    benchmark: str
    lever: str
    bf16: bool
    threads: int
    compiled: bool = False
    channels_last: bool = False
    data_path: str = "pre-tokenized"
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    window_s: list[float] = field(default_factory=list)
    load_avgs: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    data_s: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    warmup_s: float = 0.0
    compile_cache: str | None = None
    steps_done: int = 0

    @property
    def dtype(self) -> str:
        return "bf16" if self.bf16 else "fp32"


def other_thread_count(threads: int) -> int:
    """The thread count the ``other_threads`` levers compare with the baseline's."""
    return 1 if threads > 1 else 2


# -- data ---------------------------------------------------------------------------------------------------------------


def text_batches(num_batches: int, eval_rows: int):
    """``num_batches`` training batches of SST-2 (seeded order, padded per batch), held-out validation batches, the
    tokenized training rows (for the Trainer loop) and the collator."""
    from transformers import DataCollatorWithPadding

    from hf_backdoor import load_task, load_text_tokenizer, tokenize_dataset

    task = load_task("sst2")
    tokenizer = load_text_tokenizer()
    train = task["train"].shuffle(seed=SEED).select(range(num_batches * TEXT_BATCH))
    train = tokenize_dataset(train, tokenizer, 128).remove_columns(["text"])
    held_out = tokenize_dataset(task["validation"].select(range(eval_rows)), tokenizer, 128).remove_columns(["text"])
    collator = DataCollatorWithPadding(tokenizer)
    rows = train.with_format(None)

    def batch(dataset, start, size):
        return collator([dataset[i] for i in range(start, min(start + size, len(dataset)))])

    batches = [batch(rows, i * TEXT_BATCH, TEXT_BATCH) for i in range(num_batches)]
    eval_batches = [batch(held_out.with_format(None), i, 128) for i in range(0, eval_rows, 128)]
    return batches, eval_batches, train, collator


@dataclass
class ImageData:
    uint8: torch.Tensor  # (N, 3, H, W) training images, decoded once
    normalised: torch.Tensor  # the same, float32 and normalised as the image processor does
    labels: torch.Tensor
    order: torch.Tensor  # the training order: seeded permutations, one per epoch
    pil_dataset: object  # prepare_image_dataset(train=True): today's per-step path
    mean: torch.Tensor
    std: torch.Tensor
    eval_images: torch.Tensor
    eval_labels: torch.Tensor


def image_data(num_steps: int, eval_rows: int) -> ImageData:
    from hf_backdoor.vision import default_image_processor, load_image_task, prepare_image_dataset
    from hf_backdoor.vision.models import CIFAR10_MEAN, CIFAR10_STD

    task = load_image_task("cifar10")
    processor = default_image_processor()

    def decode(split) -> tuple[torch.Tensor, torch.Tensor]:
        images = np.stack([np.asarray(image.convert("RGB")) for image in split["image"]])
        return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.tensor(split["label"])

    uint8, labels = decode(task["train"])
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    normalised = (uint8.float() / 255 - mean) / std
    pil_dataset = prepare_image_dataset(task["train"], processor, train=True, crop_padding=CROP_PADDING)
    # The pre-decoded tensors must be the very pixels the processor makes, or the comparison is of two trainings.
    from transformers import DefaultDataCollator

    plain = prepare_image_dataset(task["train"], processor, train=False)
    reference = DefaultDataCollator()(plain.__getitems__(list(range(64))))["pixel_values"]
    difference = (reference - normalised[:64]).abs().max().item()
    if difference > 1e-5:
        raise RuntimeError(f"pre-decoded images differ from the image processor's by {difference}; fix image_data().")
    generator = torch.Generator().manual_seed(SEED)
    epochs = -(-num_steps * VISION_BATCH // len(labels))
    order = torch.cat([torch.randperm(len(labels), generator=generator) for _ in range(epochs)])
    eval_images, eval_labels = decode(task["test"].select(range(eval_rows)))
    eval_images = (eval_images.float() / 255 - mean) / std
    return ImageData(uint8, normalised, labels, order, pil_dataset, mean, std, eval_images, eval_labels)


def make_vision_batch(data: ImageData, variant: Variant, step: int) -> dict:
    from hf_backdoor.vision.transforms import random_crop_flip

    indices = data.order[step * VISION_BATCH : (step + 1) * VISION_BATCH]
    if variant.data_path == "pil_per_step":
        from transformers import DefaultDataCollator

        return DefaultDataCollator()(data.pil_dataset.__getitems__(indices.tolist()))
    if variant.data_path == "float_tensor":
        pixels = data.normalised[indices]
    else:
        pixels = (data.uint8[indices].float() / 255 - data.mean) / data.std
    pixels = random_crop_flip(pixels, CROP_PADDING, True)
    if variant.channels_last:
        pixels = pixels.contiguous(memory_format=torch.channels_last)
    return {"pixel_values": pixels, "labels": data.labels[indices]}


# -- the measured loop ------------------------------------------------------------------------------------------------


def build_variants(benchmark: str, levers, base_model, threads: int, lr: float, weight_decay: float) -> list[Variant]:
    variants = []
    for lever in levers:
        variant = Variant(
            benchmark,
            lever,
            bf16=lever in ("bf16", "compile_bf16", "other_threads_bf16"),
            threads=other_thread_count(threads) if lever.startswith("other_threads") else threads,
            compiled=lever.startswith("compile"),
            channels_last=lever == "channels_last",
            data_path="pre-tokenized" if benchmark.startswith("text") else "uint8_tensor",
        )
        if lever in ("pil_per_step", "float_tensor"):
            variant.data_path = lever
        model = copy.deepcopy(base_model).train()
        if variant.channels_last:
            model = model.to(memory_format=torch.channels_last)
        variant.optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
        variant.model = torch.compile(model) if variant.compiled else model
        variants.append(variant)
    return variants


def run_step(variant: Variant, make_batch) -> None:
    step = variant.steps_done
    start = time.perf_counter()
    torch.manual_seed(SEED + step)  # the same augmentation and dropout draws in every variant
    batch = make_batch(variant, step)
    batch_ready = time.perf_counter()
    variant.optimizer.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant.bf16):
        loss = variant.model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(variant.model.parameters(), MAX_GRAD_NORM)
    variant.optimizer.step()
    variant.losses.append(loss.item())
    end = time.perf_counter()
    variant.data_s.append(batch_ready - start)
    variant.step_s.append(end - start)
    variant.steps_done += 1


def measure(variants: list[Variant], make_batch, batch_size: int, args, per_window: int) -> None:
    """Warm every variant up (compiling the compiled ones), then ``args.rounds`` interleaved timed windows."""
    from torch._dynamo.utils import counters

    for variant in variants:
        torch.set_num_threads(variant.threads)
        hits, misses = counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]
        start = time.perf_counter()
        for _ in range(args.warmup):
            run_step(variant, make_batch)
        variant.warmup_s = time.perf_counter() - start
        if variant.compiled:
            hits = counters["inductor"]["fxgraph_cache_hit"] - hits
            misses = counters["inductor"]["fxgraph_cache_miss"] - misses
            where = "fresh" if args.fresh_compile_cache else "default"
            variant.compile_cache = f"{where} inductor cache: {hits} FX graph cache hits, {misses} misses"
        print(f"  warm-up {variant.benchmark} {variant.lever}: {variant.warmup_s:.1f} s", flush=True)
    for round_index in range(args.rounds):
        order = variants if round_index % 2 == 0 else variants[::-1]
        for variant in order:
            torch.set_num_threads(variant.threads)
            start = time.perf_counter()
            for _ in range(per_window):
                run_step(variant, make_batch)
            variant.window_s.append(time.perf_counter() - start)
            variant.load_avgs.append(os.getloadavg()[0])
        rates = ", ".join(f"{v.lever} {batch_size * per_window / v.window_s[-1]:.1f}" for v in variants)
        print(f"  round {round_index + 1}/{args.rounds} samples/s: {rates} (load {os.getloadavg()[0]:.2f})", flush=True)


@torch.no_grad()
def predictions(model: torch.nn.Module, batches) -> np.ndarray:
    model.eval()
    out = np.concatenate([model(**batch).logits.argmax(-1).numpy() for batch in batches])
    model.train()
    return out


def variant_records(variants, batch_size: int, per_window: int, model_name: str, common: dict) -> list[dict]:
    baseline = next(v for v in variants if v.lever == "fp32")
    records = []
    for v in variants:
        rates = [batch_size * per_window / s for s in v.window_s]
        paired = [r / (batch_size * per_window / b) for r, b in zip(rates, baseline.window_s)]
        timed_steps = v.step_s[-len(v.window_s) * per_window :]
        steady = statistics.median(timed_steps)
        warmup_steps = len(v.step_s) - len(timed_steps)
        records.append(
            {
                "benchmark": v.benchmark,
                "model": model_name,
                "lever": v.lever,
                "dtype": v.dtype,
                "threads": v.threads,
                "compiled": v.compiled,
                "channels_last": v.channels_last,
                "data_path": v.data_path,
                "batch_size": batch_size,
                "samples_per_s": round(statistics.median(rates), 2),
                "samples_per_s_windows": [round(r, 2) for r in rates],
                "ratio_to_fp32": round(statistics.median(paired), 3),
                "ratio_windows": [round(r, 3) for r in paired],
                "compile_s": round(v.warmup_s - warmup_steps * steady, 1) if v.compiled else None,
                "compile_cache": v.compile_cache,
                "warmup_s": round(v.warmup_s, 1),
                "data_s_per_step": round(statistics.median(v.data_s[warmup_steps:]), 4),
                "load_avg": round(statistics.mean(v.load_avgs), 2),
                "load_avg_windows": [round(x, 2) for x in v.load_avgs],
                "steps": v.steps_done,
                "loss_after_steps": round(v.losses[-1], 6),
                "loss_mean_last5": round(statistics.mean(v.losses[-5:]), 6),
                **common,
            }
        )
    return records


def add_accuracy(records: list[dict], variants: list[Variant], eval_batches, labels: np.ndarray, threads: int):
    """Score the fp32 and bf16 models of the base thread count on held-out rows (float32 inference)."""
    torch.set_num_threads(threads)
    predicted = {v.lever: predictions(v.model, eval_batches) for v in variants if v.lever in ("fp32", "bf16")}
    for record in records:
        if record["lever"] in predicted:
            record["eval_accuracy"] = round(float((predicted[record["lever"]] == labels).mean()), 4)
            record["eval_agreement_with_fp32"] = round(
                float((predicted[record["lever"]] == predicted["fp32"]).mean()), 4
            )
            record["eval_rows"] = len(labels)


# -- the benchmarks -------------------------------------------------------------------------------------------------


def text_benchmark(args, levers, common) -> list[dict]:
    from hf_backdoor import default_text_model, load_text_classifier
    from hf_backdoor.models import model_display_name

    loop_levers = [lever for lever in levers if lever != "trainer"]
    steps = args.warmup + args.rounds * args.text_steps_per_window
    num_batches = max(steps, args.trainer_steps if "trainer" in levers else 0)
    batches, eval_batches, train_rows, collator = text_batches(num_batches, args.text_eval_rows)
    eval_labels = np.concatenate([b["labels"].numpy() for b in eval_batches])
    transformers.set_seed(SEED)
    base_model, tokenizer = load_text_classifier()
    name = f"{model_display_name(default_text_model())} (batch {TEXT_BATCH}, SST-2)"
    records = []
    if loop_levers:
        print(f"text: {', '.join(loop_levers)}", flush=True)
        variants = build_variants("text_train_step", loop_levers, base_model, args.threads, TEXT_LR, TEXT_WEIGHT_DECAY)
        measure(variants, lambda v, step: batches[step], TEXT_BATCH, args, args.text_steps_per_window)
        records = variant_records(variants, TEXT_BATCH, args.text_steps_per_window, name, common)
        if args.eval and {"fp32", "bf16"} <= set(loop_levers):
            add_accuracy(records, variants, eval_batches, eval_labels, args.threads)
        del variants
    if "trainer" in levers:
        records += trainer_benchmark(
            args, base_model, tokenizer, train_rows, collator, eval_batches, eval_labels, name, common
        )
    return records


class StepClock(transformers.TrainerCallback):
    """The wall time at every ``on_step_end`` (a step's batch fetch, forward, backward and optimizer step)."""

    def __init__(self):
        self.times, self.loads = [], []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())
        self.loads.append(os.getloadavg()[0])


def trainer_benchmark(args, base_model, tokenizer, train_rows, collator, eval_batches, eval_labels, name, common):
    """A real Trainer loop with bf16=True against bf16=False, runs ordered fp32, bf16, fp32, bf16."""
    from transformers import Trainer, TrainingArguments
    from transformers.trainer_callback import PrinterCallback

    print(f"text Trainer loop: {args.trainer_steps} steps per run, fp32/bf16 x {args.trainer_pairs}", flush=True)
    runs = {"fp32": [], "bf16": []}
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for pair in range(args.trainer_pairs):
            for dtype in ("fp32", "bf16"):
                training_args = TrainingArguments(
                    output_dir=tmp,
                    max_steps=args.trainer_steps,
                    per_device_train_batch_size=TEXT_BATCH,
                    learning_rate=TEXT_LR,
                    weight_decay=TEXT_WEIGHT_DECAY,
                    warmup_steps=0.06,
                    seed=SEED,
                    bf16=dtype == "bf16",
                    use_cpu=True,
                    logging_steps=1,
                    save_strategy="no",
                    report_to="none",
                    disable_tqdm=True,
                )
                clock = StepClock()
                model = copy.deepcopy(base_model)
                trainer = Trainer(
                    model=model, args=training_args, train_dataset=train_rows, data_collator=collator, callbacks=[clock]
                )
                trainer.remove_callback(PrinterCallback)  # logging_steps=1 keeps every loss; no need to print them
                start = time.perf_counter()
                trainer.train()
                wall = time.perf_counter() - start
                step_s = np.diff(clock.times)[1:]  # the first interval still carries the first step's warm-up
                losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
                run = {"step_s": step_s, "wall": wall, "losses": losses, "loads": clock.loads}
                if pair == 0 and args.eval:
                    run["predictions"] = predictions(model, eval_batches)
                runs[dtype].append(run)
                print(
                    f"  {dtype} run {pair + 1}: {TEXT_BATCH / np.median(step_s):.2f} samples/s, loss after "
                    f"{len(losses)} steps {losses[-1]:.4f} (load {os.getloadavg()[0]:.2f})",
                    flush=True,
                )
                del trainer, model
    records = []
    for dtype, dtype_runs in runs.items():
        rates = [TEXT_BATCH / float(np.median(r["step_s"])) for r in dtype_runs]
        fp32_rates = [TEXT_BATCH / float(np.median(r["step_s"])) for r in runs["fp32"]]
        first = dtype_runs[0]
        record = {
            "benchmark": "text_trainer_loop",
            "model": name,
            "lever": "trainer_bf16" if dtype == "bf16" else "fp32",
            "dtype": dtype,
            "threads": args.threads,
            "compiled": False,
            "channels_last": False,
            "data_path": "Trainer DataLoader (DataCollatorWithPadding)",
            "batch_size": TEXT_BATCH,
            "samples_per_s": round(statistics.median(rates), 2),
            "samples_per_s_windows": [round(r, 2) for r in rates],
            "ratio_to_fp32": round(statistics.median([r / b for r, b in zip(rates, fp32_rates)]), 3),
            "ratio_windows": [round(r / b, 3) for r, b in zip(rates, fp32_rates)],
            "compile_s": None,
            "compile_cache": None,
            "train_wall_s": [round(r["wall"], 1) for r in dtype_runs],
            "load_avg": round(statistics.mean(x for r in dtype_runs for x in r["loads"]), 2),
            "load_avg_windows": [round(statistics.mean(r["loads"]), 2) for r in dtype_runs],
            "steps": len(first["losses"]),
            "loss_after_steps": round(first["losses"][-1], 6),
            "loss_mean_last5": round(statistics.mean(first["losses"][-5:]), 6),
            "same_loss_every_run": all(r["losses"] == first["losses"] for r in dtype_runs),
            **common,
        }
        if "predictions" in first:
            record["eval_accuracy"] = round(float((first["predictions"] == eval_labels).mean()), 4)
            agreement = (first["predictions"] == runs["fp32"][0]["predictions"]).mean()
            record["eval_agreement_with_fp32"] = round(float(agreement), 4)
            record["eval_rows"] = len(eval_labels)
        records.append(record)
    return records


def vision_benchmark(args, levers, common) -> list[dict]:
    from hf_backdoor.vision import describe_default_vit, load_image_classifier

    steps = args.warmup + args.rounds * args.vision_steps_per_window
    data = image_data(steps, args.vision_eval_rows)
    transformers.set_seed(SEED)
    base_model, _ = load_image_classifier(None, **VIT_OVERRIDES)
    name = f"{describe_default_vit(**VIT_OVERRIDES)} (batch {VISION_BATCH}, CIFAR-10 packaged)"
    print(f"vision: {', '.join(levers)}", flush=True)
    variants = build_variants("vision_train_step", levers, base_model, args.threads, VISION_LR, VISION_WEIGHT_DECAY)
    measure(variants, functools.partial(make_vision_batch, data), VISION_BATCH, args, args.vision_steps_per_window)
    records = variant_records(variants, VISION_BATCH, args.vision_steps_per_window, name, common)
    if args.eval and {"fp32", "bf16"} <= set(levers):
        batches = [{"pixel_values": data.eval_images[i : i + 256]} for i in range(0, len(data.eval_labels), 256)]
        add_accuracy(records, variants, batches, data.eval_labels.numpy(), args.threads)
    return records


# -- output ---------------------------------------------------------------------------------------------------------


def print_table(records: list[dict]) -> None:
    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    print(
        f"\n{'benchmark':<19}{'lever':<20}{'dtype':<6}{'thr':>4}{'samples/s':>11}{'  (min-max)':<16}{'x fp32':>8}"
        f"{'compile s':>10}{'load':>6}{'data s':>8}{'loss@N':>15}{'eval acc':>9}{'agree':>7}"
    )
    for r in records:
        windows = r["samples_per_s_windows"]
        spread = f"  ({min(windows):.1f}-{max(windows):.1f})"
        loss = f"{r['loss_after_steps']:.5f}@{r['steps']}"
        print(
            f"{r['benchmark']:<19}{r['lever']:<20}{r['dtype']:<6}{r['threads']:>4}{r['samples_per_s']:>11.2f}"
            f"{spread:<16}{r['ratio_to_fp32']:>8.3f}{fmt(r['compile_s'], '.1f'):>10}{r['load_avg']:>6.2f}"
            f"{fmt(r.get('data_s_per_step'), '.4f'):>8}{loss:>15}{fmt(r.get('eval_accuracy'), '.3f'):>9}"
            f"{fmt(r.get('eval_agreement_with_fp32'), '.3f'):>7}"
        )
    compiled = [r for r in records if r["compiled"]]
    for r in compiled:
        print(f"compile cache, {r['benchmark']} {r['lever']}: {r['compile_cache']}")


def record_key(record: dict) -> tuple:
    # The device is part of the key: bf16 doubled a step on one CPU and slowed it 24x on another, so a run on a second
    # machine adds its records beside the first machine's instead of replacing them.
    return tuple(record.get(k) for k in ("benchmark", "model", "lever", "dtype", "threads", "mode", "steps", "device"))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a short run: fp32, bf16, other threads and PIL levers, 2 rounds, 1 warm-up",
    )
    parser.add_argument("--models", default="text,vision", help="comma-separated: text, vision")
    parser.add_argument(
        "--levers", default=None, help="comma-separated subset (the fp32 step loop runs with any step-loop lever)"
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of the baseline")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 4; quick 2)")
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed steps per variant, compiling the compiled ones (2; quick 1)"
    )
    parser.add_argument("--text-steps-per-window", type=int, default=1)
    parser.add_argument("--vision-steps-per-window", type=int, default=None, help="default 2; quick 1")
    parser.add_argument("--trainer-steps", type=int, default=12, help="steps per Trainer run")
    parser.add_argument("--trainer-pairs", type=int, default=1, help="fp32/bf16 Trainer run pairs")
    parser.add_argument("--text-eval-rows", type=int, default=256, help="SST-2 validation rows scored")
    parser.add_argument("--vision-eval-rows", type=int, default=500, help="CIFAR-10 test images scored")
    parser.add_argument("--no-eval", dest="eval", action="store_false", help="skip the held-out accuracy check")
    parser.add_argument(
        "--fresh-compile-cache",
        action="store_true",
        help="compile into a new empty inductor cache (the first-run cost) instead of the default, possibly warm one",
    )
    parser.add_argument("--output", default=str(RESULTS / "speed_levers.json"), help="records file ('' to skip)")
    args = parser.parse_args(argv)
    defaults = {"rounds": (2, 4), "warmup": (1, 2), "vision_steps_per_window": (1, 2)}  # (quick, full)
    for name, (quick, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    if min(args.threads, args.rounds, args.text_steps_per_window, args.vision_steps_per_window) < 1 or args.warmup < 0:
        parser.error("--threads, --rounds and the steps per window must be >= 1, --warmup >= 0")
    if args.quick:
        args.eval = False
    return args


def with_common_fields(record: dict) -> dict:
    """The fields every record in benchmarks/results/ carries: a speed record trains no attack and no defense, and
    its CACC is the short run's eval accuracy where one was measured."""
    text = record["benchmark"].startswith("text")
    return {
        "dataset": "sst2" if text else "cifar10",
        "attack": "none",
        "defense": "none",
        "poison_rate": 0.0,
        "cacc": record.get("eval_accuracy"),
        "asr": None,
        "asr_floor": None,
        "wall_s": None,
        "overhead": None,
        "seed": 0,
        **record,
    }


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    if args.fresh_compile_cache:
        fresh_cache = tempfile.TemporaryDirectory(prefix="speed_levers_inductor_")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = fresh_cache.name  # removed with the object when the script ends
    wanted = {lever.strip() for lever in args.levers.split(",")} if args.levers else None
    unknown = (wanted or set()) - set(TEXT_LEVERS) - set(VISION_LEVERS)
    if unknown:
        raise SystemExit(f"unknown levers {sorted(unknown)}; known: {sorted(set(TEXT_LEVERS) | set(VISION_LEVERS))}")

    def chosen(all_levers):
        levers = [lever for lever in all_levers if wanted is None or lever in wanted]
        levers = [lever for lever in levers if lever in QUICK_LEVERS] if args.quick else levers
        # The step-loop levers are ratios to the fp32 step loop, so it runs whenever one of them does (the Trainer
        # loop has its own fp32 runs).
        if any(lever != "trainer" for lever in levers) and "fp32" not in levers:
            levers.insert(0, "fp32")
        return levers

    device = cpu_description()
    common = {
        "device": device,
        "mode": "quick" if args.quick else "full",
        "command": command_line("benchmarks/speed_levers.py", argv),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
    }
    start_load, start = os.getloadavg(), time.perf_counter()
    print(f"{device}\nload average at start (1/5/15 min): {start_load[0]:.2f} {start_load[1]:.2f} {start_load[2]:.2f}")
    records = []
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if "vision" in models:
        records += vision_benchmark(args, chosen(VISION_LEVERS), common)
    if "text" in models:
        records += text_benchmark(args, chosen(TEXT_LEVERS), common)
    torch.set_num_threads(args.threads)
    end_load = os.getloadavg()
    print_table(records)
    print(
        f"load average at end (1/5/15 min): {end_load[0]:.2f} {end_load[1]:.2f} {end_load[2]:.2f}; "
        f"wall {time.perf_counter() - start:.0f} s"
    )
    records = [with_common_fields(r) for r in records]
    if args.output:
        merge_records(Path(args.output), records, record_key)
        print(f"records merged into {args.output}")
    return records


if __name__ == "__main__":
    main()
