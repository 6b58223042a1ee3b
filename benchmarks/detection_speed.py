"""Prediction throughput of the text defenses' detection passes: batch size and dtype, on real rows.

    python benchmarks/detection_speed.py                          # HSOL training rows, batches 16-256, fp32 and bf16
    python benchmarks/detection_speed.py --task sst2 --rows 1000 --batch-sizes 64,256 --rounds 2

BTU's flip, task-word and mislabel tests and Z-defense's leave-out predict a few thousand token-id rows at each
epoch's end, in length-sorted batches (``hf_backdoor.defenses._shared.tokens.length_batches``); at stop 51 that was
most of the default stack's added wall time on HSOL (BTU's selection, 41-47 s of a 189-215 s run). What is timed here
is that pass: argmax predictions of the default text model (pretrained MiniLM-L6, a seeded classification head) over
``--rows`` seeded training rows of ``--task`` (tokenized to 128 tokens), once per batch size and dtype (``fp32``, and
``bf16``: ``torch.autocast("cpu", dtype=torch.bfloat16)``). ``rows_per_s`` is the median over ``--rounds`` interleaved
rounds (every variant once per round, forward order on even rounds and reverse on odd ones, so that contention on the
shared cores hits them alike); ``ratio_to_baseline`` is the median of each round's rate over the baseline's (fp32 at
256 rows, the detection batch before stop 52). ``agreement`` is the share of rows whose argmax equals the fp32
baseline's: with an untrained head most logits are near zero, so this is a pessimistic view of what bf16 moves.

Records (flat, one per variant) are merged into ``benchmarks/results/detection_speed.json``: a record with the same
task, rows, batch size, dtype, threads and device replaces the older one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
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
from benchmarks.common.records import RESULTS, command_line, device_name, merge_records  # noqa: E402

BASELINE = ("fp32", 256)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="hsol", help="a packaged text task (hf_backdoor.load_task)")
    parser.add_argument("--rows", type=int, default=2000, help="seeded training rows predicted per variant")
    parser.add_argument("--batch-sizes", default="16,32,64,128,256", help="comma-separated")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(RESULTS / "detection_speed.json"), help="records file ('' to skip)")
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.dtypes = [d.strip() for d in args.dtypes.split(",")]
    if BASELINE[1] not in args.batch_sizes or BASELINE[0] not in args.dtypes:
        parser.error(f"the baseline ({BASELINE[0]}, batch {BASELINE[1]}) must be among the variants")
    if set(args.dtypes) - {"fp32", "bf16"} or min(args.batch_sizes) < 1 or min(args.rows, args.rounds) < 1:
        parser.error("--dtypes are fp32 and bf16; batch sizes, --rows and --rounds must be >= 1")
    return args


@torch.no_grad()
def predict(model, rows: list[list[int]], pad_id: int, batch_size: int, bf16: bool) -> tuple[np.ndarray, float]:
    """Argmax predictions in row order and the seconds they took (BTU's ``_predict``, with the batch and dtype)."""
    from hf_backdoor.defenses._shared.tokens import length_batches

    out = np.zeros(len(rows), dtype=np.int64)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for chunk, ids, mask in length_batches(rows, pad_id, "cpu", batch_size):
            out[chunk] = model(input_ids=ids, attention_mask=mask).logits.float().argmax(-1).numpy()
    return out, time.perf_counter() - start


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    argv = sys.argv[1:] if argv is None else argv
    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForSequenceClassification

    from hf_backdoor import default_text_model, load_task, load_text_tokenizer

    tokenizer = load_text_tokenizer()
    train = load_task(args.task)["train"]
    train = train.shuffle(seed=args.seed).select(range(min(args.rows, len(train))))
    rows = [tokenizer(text, truncation=True, max_length=128)["input_ids"] for text in train["text"]]
    torch.manual_seed(args.seed)
    num_labels = len(set(train["label"]))
    model = AutoModelForSequenceClassification.from_pretrained(default_text_model(), num_labels=num_labels).eval()
    variants = [(dtype, batch) for dtype in args.dtypes for batch in args.batch_sizes]
    for dtype, batch in variants:  # untimed: first-call allocations and oneDNN kernel selection
        predict(model, rows[: 2 * batch], tokenizer.pad_token_id, batch, dtype == "bf16")
    seconds = {v: [] for v in variants}
    predictions = {}
    start_load = os.getloadavg()[0]
    for round_ in range(args.rounds):
        for variant in variants if round_ % 2 == 0 else variants[::-1]:
            predictions[variant], took = predict(model, rows, tokenizer.pad_token_id, variant[1], variant[0] == "bf16")
            seconds[variant].append(took)
    end_load = os.getloadavg()[0]
    common = {
        "dataset": args.task,
        "attack": "none",
        "defense": "none",
        "model": "all-MiniLM-L6-v2 (pretrained; seeded classification head)",
        "poison_rate": 0.0,
        "cacc": None,
        "asr": None,
        "asr_floor": None,
        "wall_s": None,
        "overhead": None,
        "device": device_name(),
        "seed": args.seed,
        "command": command_line("benchmarks/detection_speed.py", argv),
        "benchmark": "detection_predict",
        "rows": len(rows),
        "mean_tokens": round(float(np.mean([len(r) for r in rows])), 1),
        "threads": args.threads,
        "load_avg_start_end": [round(start_load, 2), round(end_load, 2)],
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    records = []
    for variant in variants:
        ratios = [base / took for base, took in zip(seconds[BASELINE], seconds[variant])]
        records.append(
            {
                **common,
                "dtype": variant[0],
                "batch_size": variant[1],
                "rows_per_s": round(len(rows) / statistics.median(seconds[variant]), 1),
                "seconds_rounds": [round(s, 2) for s in seconds[variant]],
                "ratio_to_baseline": round(statistics.median(ratios), 3),
                "agreement": round(float((predictions[variant] == predictions[BASELINE]).mean()), 4),
            }
        )
    print(
        f"\n{args.task}: {len(rows)} rows, mean {common['mean_tokens']} tokens, {args.threads} threads, "
        f"{args.rounds} rounds; load {start_load:.2f} -> {end_load:.2f}; {common['device']}"
    )
    print(f"{'dtype':<6}{'batch':>6}{'rows/s':>9}{'x fp32@256':>12}{'agreement':>11}  seconds per round")
    for r in records:
        print(
            f"{r['dtype']:<6}{r['batch_size']:>6}{r['rows_per_s']:>9.1f}{r['ratio_to_baseline']:>12.3f}"
            f"{r['agreement']:>11.4f}  {r['seconds_rounds']}"
        )
    if args.output:
        key = ("benchmark", "dataset", "rows", "batch_size", "dtype", "threads", "device")
        merge_records(Path(args.output), records, lambda record: tuple(record.get(k) for k in key))
        print(f"records merged into {args.output}")
    return records


if __name__ == "__main__":
    main()
