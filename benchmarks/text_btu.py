"""BTU benchmark: plain ``Trainer`` against ``BackdoorSafeTrainer`` + BTU on the same poisoned data.

    python benchmarks/text_btu.py                                       # the issue's grid (hours on 2 CPU cores)
    python benchmarks/text_btu.py --cell "--dataset hsol --attack badnet,addsent"
    python benchmarks/text_btu.py --cell "--dataset sst2 --attack badnet --runs btu --btu_paper"

Each cell is one run of ``recipes/sst2_btu.py`` (its arguments) in a subprocess: a clean model for the ASR floor,
the undefended model and the BTU model, per attack. Then one table is printed and the records are merged into
``benchmarks/results/text_btu.json`` (a record of the same dataset / attack / ASR attack / defense / variant / run
is replaced). A record whose cell trained no clean model takes its ASR floor from a clean-model record of the same
dataset, model, seed and triggered rows already in ``results/`` (``asr_floor_source`` says which).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root: benchmarks/common, not installed
from benchmarks.common.records import (  # noqa: E402
    RESULTS,
    fill_floors,
    known_records,
    merge_records,
    recipe_records,
    shown,
)

GRID = [
    "--dataset sst2 --attack badnet --runs clean,undefended,btu",
    "--dataset sst2 --attack addsent,syntactic,style --runs clean,undefended,btu",
    "--dataset sst2 --attack badnet,addsent,syntactic,style --clean_data --runs btu",
    "--dataset hsol --attack badnet,addsent --runs clean,undefended,btu",
    "--dataset agnews --attack badnet --runs clean,undefended,btu",
]


def _key(record: dict) -> tuple:
    return (
        record["dataset"],
        record["attack"],
        record["asr_attack"],
        record["defense"],
        record.get("btu_variant"),
        record.get("run"),
        record["poison_rate"],
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", action="append", help="recipe arguments of one cell (repeatable; default: GRID)")
    parser.add_argument("--output", default=str(RESULTS / "text_btu.json"))
    args = parser.parse_args()
    cells = args.cell or GRID
    output = Path(args.output)
    new_records = []
    with tempfile.TemporaryDirectory() as tmp:
        for index, cell in enumerate(cells):
            for record in recipe_records("sst2_btu.py", shlex.split(cell), Path(tmp), f"cell_{index}.json"):
                record["command"] = f"python benchmarks/text_btu.py --cell {shlex.quote(cell)}"
                new_records.append(record)
    fill_floors(new_records, known_records(new_records))
    print(
        f"\n{'dataset':<8}{'attack':<10}{'scored on':<11}{'defense':<8}{'CACC':>7}{'ASR':>7}{'floor':>7}"
        f"{'overhead':>9}  flagged"
    )
    for r in new_records:
        floor = shown(r["asr_floor"])
        overhead = shown(r["overhead"], ".2f", "x")
        print(
            f"{r['dataset']:<8}{r['attack']:<10}{r['asr_attack']:<11}{r['defense']:<8}{r['cacc']:>7.3f}"
            f"{r['asr']:>7.3f}{floor:>7}{overhead:>9}  {r.get('flagged_tokens', '')}"
        )
    merge_records(output, new_records, _key)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
