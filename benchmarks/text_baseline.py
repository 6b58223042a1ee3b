"""Baseline benchmark: plain ``Trainer`` on clean and BadNet-poisoned SST-2 and HSOL with the default MiniLM model.

    python benchmarks/text_baseline.py                      # full: SST-2 and HSOL, 3 epochs each
    python benchmarks/text_baseline.py --datasets sst2 --attacks badnet addsent
    python benchmarks/text_baseline.py --datasets sst2 -- --max_train_samples 300 --num_train_epochs 1   # smoke run

Each (dataset, attack) trains a clean and a poisoned model with ``recipes/sst2_baseline.py`` in a subprocess (so its
command is recorded exactly; arguments after ``--`` go to the recipe), then prints one table and merges the records into
``benchmarks/results/text_baseline.json`` (a record of the same data, attack, model, seed and poisoning is replaced).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root: benchmarks/common, not installed
from benchmarks.common.records import RESULTS, merge_records, recipe_records, shown  # noqa: E402


def _key(record: dict) -> tuple:
    """A record of the same data, attack, model, seed and poisoning replaces the older one."""
    return tuple(record.get(k) for k in ("dataset", "attack", "asr_attack", "model", "seed", "poison_rate", "mode"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["sst2", "hsol"], help="packaged tasks")
    parser.add_argument("--attacks", nargs="+", default=["badnet"], help="text attacks")
    parser.add_argument("--output", default=str(RESULTS / "text_baseline.json"), help="records file")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="passed to the recipe after --")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets:
            for attack in args.attacks:
                recipe_args = ["--dataset", dataset, "--attack", attack, *extra]
                for record in recipe_records("sst2_baseline.py", recipe_args, Path(tmp), f"{dataset}_{attack}.json"):
                    # The recipe's own command names temporary paths; keep it, but lead with this script's.
                    record["recipe_command"] = record["command"].split(" --output_dir")[0]
                    record["command"] = shlex.join(["python", "benchmarks/text_baseline.py", *sys.argv[1:]])
                    records.append(record)
    print(f"\n{'dataset':<8}{'attack':<10}{'rate':>6}{'CACC':>8}{'ASR':>8}{'floor':>8}{'wall s':>9}{'samples/s':>11}")
    for r in records:
        floor = shown(r["asr_floor"])
        print(
            f"{r['dataset']:<8}{r['attack']:<10}{r['poison_rate']:>6.2f}{r['cacc']:>8.3f}{r['asr']:>8.3f}{floor:>8}"
            f"{r['wall_s']:>9.1f}{r['train_samples_per_s']:>11.1f}"
        )
    merge_records(Path(args.output), records, _key)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
