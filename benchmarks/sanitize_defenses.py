"""Post-training removal benchmark: RNP, NAD, TSBD (NWC) and plain fine-tuning on the same backdoored models.

    python benchmarks/sanitize_defenses.py                      # the issue's grid (GPU: minutes; 2 CPU cores: hours)
    python benchmarks/sanitize_defenses.py --only text          # SST-2 cells only
    python benchmarks/sanitize_defenses.py --smoke              # tiny settings, to check the plumbing
    python benchmarks/sanitize_defenses.py --cell "--modality vision --attack blended --defenses rnp,nwc"

Each cell is one run of a sanitize recipe (its arguments) in a subprocess: ``--modality text`` runs
``recipes/sst2_sanitize.py``, ``--modality vision`` ``recipes/cifar10_sanitize.py``. A cell whose arguments contain
``{model:NAME}`` repairs the backdoored model saved by the cell tagged ``NAME`` (``--tag NAME`` and ``--modality`` are
not recipe arguments: they name the cell's output folder and its recipe) instead of training a new one, so the RNP
unit kinds are compared on the same weights. ``--work-dir DIR`` keeps the cells' folders (and so their saved models,
``DIR/TAG/undefended``) for later runs' ``--load_model``; by default they go to a temporary folder that is removed. Then one table is printed and the
records are merged into ``benchmarks/results/sanitize_defenses.json`` (a record of the same dataset / attack /
defense / exposure / RNP settings / overrides / clean-row source / poison rate / model / seed is replaced). BTU's
SST-2 records from ``results/text_btu.json`` are shown beside the table for comparison, not re-run.

Records are flat: dataset, attack, defense (none, rnp, nad, nwc, finetune), exposure (``None``, or ``"cul"`` for
EBYD's variant of RNP / NWC from the recipe's ``--exposed``, shown as ``rnp+cul``), model, poison_rate, cacc, asr,
asr_floor, wall_s (the defense's, plus the exposure's for an exposed variant, or the training's for ``none``), overhead
(defense wall time over the training run it repairs), device, seed, command, plus each defense's details.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root: benchmarks/common, not installed
from benchmarks.common.records import (  # noqa: E402
    RESULTS,
    crop_key,
    fill_floors,
    known_records,
    merge_records,
    shown,
)

RECIPES = {"text": "recipes/sst2_sanitize.py", "vision": "recipes/cifar10_sanitize.py"}
ALL = "rnp,nad,nwc,finetune"
GRID = [
    # SST-2, BadNet 10%, default MiniLM: the four defenses (RNP on its default FFN + LayerNorm units, its threshold
    # sweep scored), then RNP on each unit kind alone on the same weights.
    f"--tag sst2_badnet --modality text --dataset sst2 --attack badnet --defenses {ALL} --floor --score_sweep",
    *(
        f"--modality text --dataset sst2 --attack badnet --defenses rnp --rnp_units {units} --score_sweep "
        "--load_model {model:sst2_badnet}"
        for units in ("ffn", "head", "layernorm")
    ),
    # Small ViT on the CIFAR-10 subset ({cifar}: the 10k/2k npz of the reference when present, else the packaged
    # copy), BadNets and Blended 10%.
    f"--tag vit_badnet --modality vision --dataset {{cifar}} --attack badnet --defenses {ALL} --floor --score_sweep",
    *(
        f"--modality vision --dataset {{cifar}} --attack badnet --defenses rnp --rnp_units {units} --score_sweep "
        "--load_model {model:vit_badnet}"
        for units in ("ffn", "head", "layernorm")
    ),
    f"--modality vision --dataset {{cifar}} --attack blended --defenses {ALL} --floor --score_sweep",
]
CIFAR_NPZ = ROOT.parent / "shared" / "data" / "cifar10_32.npz"
SMOKE = "--max_train_samples 300 --max_eval_samples 200 --num_train_epochs 1 --defense_epochs 1 --clean_fraction 0.2"


def _key(record: dict) -> tuple:
    return (
        record["dataset"],
        record["attack"],
        record.get("attack_kwargs"),  # a non-default attack setting (e.g. a stronger WaNet warp): another result
        record["defense"],
        record.get("exposure"),  # rnp and rnp+cul are different results; older records (no field) are plain runs
        record.get("rnp_units"),
        # RNP's defaults changed (stop check, recovery rate): runs under the old ones are other results, not replaced
        record.get("rnp_unlearning_stop"),
        record.get("rnp_recovering_lr"),
        record.get("defense_overrides"),
        # clean rows from the training set or held out of it: the same defense on other data is another result
        record.get("clean_source"),
        record.get("num_clean_rows"),  # 500 or 1,000 clean rows: another result
        record.get("fit_augmentation"),  # the repair trained on augmented or stored images: another result
        record["poison_rate"],
        record["model"],
        # one shape trained for 30 or 45 epochs: two models, two results (older records have no field)
        record.get("model_epochs"),
        crop_key(record),
        record["seed"],
    )


def _pop(words: list[str], flag: str, default: str) -> str:
    """The value of a cell keyword that is not a recipe argument (``--tag``, ``--modality``), removed from ``words``."""
    if flag not in words:
        return default
    at = words.index(flag)
    value = words[at + 1]
    del words[at : at + 2]
    return value


def _model_key(record: dict) -> tuple:
    return (
        record["dataset"],
        record["attack"],
        record["model"],
        record.get("model_epochs"),
        crop_key(record),
        record["seed"],
    )


def _rows_key(record: dict) -> tuple:
    """The model and the rows its ASR is read on (held-out clean rows come out of the evaluation)."""
    return *_model_key(record), record.get("clean_source"), record.get("num_clean_rows")


def _fill_floors_from_output(records: list[dict], output: Path) -> None:
    """A cell that loads a saved model without ``--floor-model`` takes the floor an earlier record of ``output``
    measured for the same model on the same rows (a clean model trained again would give the same number)."""
    existing = json.loads(output.read_text()) if output.exists() else []
    floors = {_rows_key(r): r for r in existing if r.get("asr_floor") is not None}
    for record in records:
        earlier = floors.get(_rows_key(record))
        if record.get("asr_floor") is None and earlier is not None:
            record["asr_floor"] = earlier["asr_floor"]
            record["asr_floor_source"] = f"{output.name}: the floor of `{earlier['command']}` on the same rows"


def _fill_overheads(records: list[dict]) -> None:
    """A cell that loaded its model has no training time of its own: take the one of the run that trained it."""
    trained = {_model_key(r): r["wall_s"] for r in records if r["defense"] == "none" and r.get("wall_s")}
    for record in records:
        train_wall = trained.get(_model_key(record))
        if record["defense"] != "none" and record.get("overhead") is None and record.get("wall_s") and train_wall:
            record["overhead"] = round(record["wall_s"] / train_wall, 3)


def _btu_rows() -> list[dict]:
    path = RESULTS / "text_btu.json"
    if not path.exists():
        return []
    return [
        r
        for r in json.loads(path.read_text())
        if r["dataset"] == "sst2"
        and r["attack"] == "badnet"
        and r["defense"] == "btu"
        and r.get("asr_attack") == "badnet"
    ]


def _label(record: dict) -> str:
    """The defense column: ``rnp``, or ``rnp+cul`` for the exposed variant."""
    return record["defense"] + (f"+{record['exposure']}" if record.get("exposure") else "")


def _print_table(records: list[dict]) -> None:
    print(
        f"\n{'dataset':<9}{'attack':<9}{'defense':<10}{'units':<11}{'CACC':>7}{'ASR':>7}{'floor':>7}{'wall s':>9}"
        f"{'overhead':>10}  device"
    )
    for r in records:
        if r.get("error"):
            print(
                f"{r['dataset']:<9}{r['attack']:<9}{_label(r):<10}{r.get('rnp_units') or '':<11}  failed: {r['error']}"
            )
            continue
        floor = shown(r.get("asr_floor"))
        wall = shown(r.get("wall_s"), ".1f")
        overhead = shown(r.get("overhead"), ".2f", "x")
        print(
            f"{r['dataset']:<9}{r['attack']:<9}{_label(r):<10}{r.get('rnp_units') or '':<11}{r['cacc']:>7.3f}"
            f"{r['asr']:>7.3f}{floor:>7}{wall:>9}{overhead:>10}  {r['device']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", action="append", help="recipe arguments of one cell (repeatable; default: GRID)")
    parser.add_argument("--only", choices=["text", "vision"], default=None, help="run only this modality's cells")
    parser.add_argument("--smoke", action="store_true", help=f"append tiny settings to every cell ({SMOKE})")
    parser.add_argument("--extra", default="", help="recipe arguments appended to every cell (e.g. --bf16)")
    parser.add_argument("--output", default=str(RESULTS / "sanitize_defenses.json"))
    parser.add_argument(
        "--work-dir",
        default=None,
        help="keep each cell's output folder (its saved models) under this folder; default: a temporary one, removed",
    )
    args = parser.parse_args()
    cells = args.cell or GRID
    if args.only:
        cells = [c for c in cells if f"--modality {args.only}" in c]
    extra = shlex.split(args.extra) + (shlex.split(SMOKE) if args.smoke else [])
    new_records = []
    with contextlib.ExitStack() as stack:
        if args.work_dir:
            tmp = args.work_dir
            Path(tmp).mkdir(parents=True, exist_ok=True)
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory())
        for index, cell in enumerate(cells):
            words = shlex.split(cell)
            tag, modality = _pop(words, "--tag", f"cell_{index}"), _pop(words, "--modality", "text")
            if modality not in RECIPES:
                raise SystemExit(f"cell {cell!r}: --modality must be one of {sorted(RECIPES)}")
            cifar = str(CIFAR_NPZ) if CIFAR_NPZ.exists() else "cifar10"
            words = [
                str(Path(tmp) / w[len("{model:") : -1] / "undefended") if w.startswith("{model:") else w for w in words
            ]
            words = [cifar if w == "{cifar}" else w for w in words]
            out = Path(tmp) / f"{tag}.json"
            cmd = [
                sys.executable,
                str(ROOT / RECIPES[modality]),
                *words,
                *extra,
                "--output_dir",
                str(Path(tmp) / tag),
                "--results_json",
                str(out),
            ]
            print(f"[{index + 1}/{len(cells)}] {RECIPES[modality]} {shlex.join(words + extra)}", flush=True)
            completed = subprocess.run(cmd, cwd=ROOT)
            if completed.returncode != 0 or not out.exists():
                print(f"cell failed (exit {completed.returncode}): {cell}", flush=True)
                continue
            for record in json.loads(out.read_text()):
                record["command"] = "python benchmarks/sanitize_defenses.py --cell " + shlex.quote(
                    shlex.join(["--modality", modality, *words, *extra])
                )
                new_records.append(record)
    _fill_overheads(new_records)
    # A cell run with --floor gives its floor to the cells that repair its model; the others take a clean model's
    # from results/ on the same rows.
    floors = {_model_key(r): r["asr_floor"] for r in new_records if r.get("asr_floor") is not None}
    for record in new_records:
        if record.get("asr_floor") is None:
            record["asr_floor"] = floors.get(_model_key(record))
    _fill_floors_from_output(new_records, Path(args.output))
    fill_floors(new_records, known_records(), attack_field="attack")
    _print_table(new_records)
    btu = _btu_rows()
    if btu:
        print("\nBTU on the same task (from results/text_btu.json, trained with the defense, not post-training):")
        for r in btu:
            print(
                f"  sst2 badnet btu ({r.get('btu_variant')}): CACC {r['cacc']:.3f} ASR {r['asr']:.3f} wall {r['wall_s']}s"
            )

    # Cells that repair the same saved model each report its undefended scores: keep one record per key.
    new_records = list({_key(r): r for r in new_records}.values())
    merged = merge_records(Path(args.output), new_records, _key)
    print(f"\n{len(new_records)} records written to {args.output} ({len(merged)} in all)")


if __name__ == "__main__":
    main()
