"""Baseline benchmark: plain ``Trainer`` on clean and BadNet-poisoned SST-2 and HSOL with the default MiniLM model.

    python benchmarks/text_baseline.py                      # full: SST-2 and HSOL, 3 epochs each
    python benchmarks/text_baseline.py --datasets sst2 --attacks badnet addsent

Each (dataset, attack) trains a clean and a poisoned model with ``recipes/sst2_baseline.py``, in a subprocess (so its command is recorded exactly),
then prints one table and writes ``benchmarks/results/text_baseline.json``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["sst2", "hsol"])
    parser.add_argument("--attacks", nargs="+", default=["badnet"])
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "text_baseline.json"))
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="passed to the recipe after --")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for dataset in args.datasets:
            for attack in args.attacks:
                out = Path(tmp) / f"{dataset}_{attack}.json"
                cmd = [
                    sys.executable,
                    str(ROOT / "recipes" / "sst2_baseline.py"),
                    "--dataset",
                    dataset,
                    "--attack",
                    attack,
                    "--output-dir",
                    str(Path(tmp) / "runs"),
                    "--results-json",
                    str(out),
                    *extra,
                ]
                subprocess.run(cmd, check=True, cwd=ROOT)
                for record in json.loads(out.read_text()):
                    # The recipe's own command names temporary paths; keep it, but lead with this script's.
                    record["recipe_command"] = record["command"].split(" --output-dir")[0]
                    record["command"] = shlex.join(["python", "benchmarks/text_baseline.py", *sys.argv[1:]])
                    records.append(record)
    print(f"\n{'dataset':<8}{'attack':<10}{'rate':>6}{'CACC':>8}{'ASR':>8}{'floor':>8}{'wall s':>9}{'samples/s':>11}")
    for r in records:
        floor = "-" if r["asr_floor"] is None else f"{r['asr_floor']:.3f}"
        print(
            f"{r['dataset']:<8}{r['attack']:<10}{r['poison_rate']:>6.2f}{r['cacc']:>8.3f}{r['asr']:>8.3f}{floor:>8}"
            f"{r['wall_s']:>9.1f}{r['train_samples_per_s']:>11.1f}"
        )
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
