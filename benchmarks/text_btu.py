"""BTU benchmark: plain ``Trainer`` against ``BackdoorSafeTrainer`` + BTU on the same poisoned data.

    python benchmarks/text_btu.py                                   # the issue's grid (hours on 2 CPU cores)
    python benchmarks/text_btu.py --grid sst2:badnet hsol:addsent   # a part of it
    python benchmarks/text_btu.py --grid sst2:badnet -- --paper     # the published procedure

Each grid cell runs ``recipes/sst2_btu.py`` in a subprocess (a clean model for the ASR floor, the undefended model,
the BTU model), then one table is printed and the records are merged into ``benchmarks/results/text_btu.json``
(records of the same dataset/attack/defense/variant are replaced).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = [
    "sst2:badnet",
    "sst2:addsent",
    "sst2:syntactic",
    "sst2:style",
    "sst2:none",
    "hsol:badnet",
    "hsol:addsent",
    "agnews:badnet",
]


def _key(record: dict) -> tuple:
    return (
        record["dataset"],
        record["asr_attack"],
        record["attack"],
        record["defense"],
        record.get("btu_variant"),
        record["poison_rate"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", nargs="+", default=GRID, help="dataset:attack cells (attack 'none' = clean data)")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "text_btu.json"))
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="passed to the recipe after --")
    args = parser.parse_args()
    extra = [a for a in args.extra if a != "--"]
    new_records = []
    with tempfile.TemporaryDirectory() as tmp:
        for cell in args.grid:
            dataset, attack = cell.split(":")
            out = Path(tmp) / f"{dataset}_{attack}.json"
            cmd = [
                sys.executable,
                str(ROOT / "recipes" / "sst2_btu.py"),
                "--dataset",
                dataset,
                "--output-dir",
                str(Path(tmp) / "runs"),
                "--results-json",
                str(out),
                *extra,
            ]
            if attack == "none":  # clean data: BTU must keep CACC and show what it flags
                cmd += ["--runs", "clean,btu", "--clean-data"]
            else:
                cmd += ["--attack", attack]
            subprocess.run(cmd, check=True, cwd=ROOT)
            new_records.extend(json.loads(out.read_text()))
    output = Path(args.output)
    records = json.loads(output.read_text()) if output.exists() else []
    replaced = {_key(r) for r in new_records}
    records = [r for r in records if _key(r) not in replaced] + new_records
    print(f"\n{'dataset':<8}{'attack':<10}{'defense':<8}{'CACC':>7}{'ASR':>7}{'floor':>7}{'overhead':>9}  flagged")
    for r in new_records:
        floor = "-" if r["asr_floor"] is None else f"{r['asr_floor']:.3f}"
        overhead = "-" if r["overhead"] is None else f"{r['overhead']:.2f}x"
        print(
            f"{r['dataset']:<8}{r['attack']:<10}{r['defense']:<8}{r['cacc']:>7.3f}{r['asr']:>7.3f}{floor:>7}"
            f"{overhead:>9}  {r.get('flagged_tokens', '')}"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(records, indent=1) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
