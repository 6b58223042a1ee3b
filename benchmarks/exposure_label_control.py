"""Control for EBYD's backdoor-label detection: is the target found because of the trigger, or because dirty-label
poisoning makes the target the commonest training label?

    python benchmarks/exposure_label_control.py --config-overrides patch_size=8 --crop-padding 0 --epochs 20 \\
        --models-dir M --data ../shared/data/cifar10_32.npz

Trains the ViT of ``vision_defenses.py``'s ``vision_cul`` section on the training rows with exactly the labels the
poisoning of ``--attacks`` (its first attack, BadNets by default) gives them (the same rows flipped to the target,
20% of the labels on CIFAR-10 at rate 0.1) but **without the trigger**, then exposes it with every method on 1%
and 5% clean rows (the unflipped rows, as ``vision_cul`` excludes the poisoned ones; the test split's with
``--cul-clean-from test``) and records the detected label and score. If the exposure lands on the
target here too, a "right" label on a backdoored model says nothing about its backdoor. The model is kept in
``--models-dir`` next to ``vision_cul``'s models (``label_flip_seedN/flipped``) and reused.

Records (merged into ``--output``): ``attack`` is ``none`` (no trigger was planted) with ``control`` =
``"dirty labels, no trigger"``; the rest as ``vision_cul``'s records (``cul_method``, ``cul_clean_fraction``,
``cul_label``, ``cul_label_is_target``, ``cul_score``, ``cul_shares``).
"""

from __future__ import annotations

import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: benchmarks/common, not installed
from benchmarks import vision_defenses as vd  # noqa: E402
from benchmarks.common import records, runs, vision  # noqa: E402

SETTINGS = [(method, fraction) for method in ("cul", "rnp_unlearning", "random_label") for fraction in (0.01, 0.05)]
CONTROL = "dirty labels, no trigger"


def _key(record: dict) -> tuple:
    return records.defenses_record_key(record) + (record.get("control"),)


def label_flip_rows(clean_rows, poisoned_rows):
    """``clean_rows`` (untouched images) with the labels of ``poisoned_rows``, the same rows after a dirty-label
    poisoning: the label shift of the attack without its trigger."""
    if not np.array_equal(np.asarray(poisoned_rows["orig_label"]), np.asarray(clean_rows["label"])):
        raise ValueError("The poisoned rows are not the clean rows in the same order: cannot carry their labels over.")
    labels = [int(label) for label in poisoned_rows["label"]]
    feature = clean_rows.features["label"]
    return clean_rows.remove_columns("label").add_column("label", labels, feature=feature)


def main(argv=None) -> list[dict]:
    from hf_backdoor.defenses import ExposeConfig, expose_model

    argv = sys.argv[1:] if argv is None else argv
    args = vd.parse_args(argv)
    # vision_defenses' --output defaults to its own file; this control keeps its records apart
    output = Path(args.output) if "--output" in argv else records.RESULTS / "exposure_label_control.json"
    attack_name = vd._split(args.attacks)[0]
    seed = args.seed
    recipe = vd.load_recipe()
    command = "python benchmarks/exposure_label_control.py " + shlex.join(argv)
    found = []
    with tempfile.TemporaryDirectory() as tmp:
        script, training_args = recipe.parse_args(vd.recipe_argv(args, attack_name, seed, Path(tmp)))
        task, attack, poisoned, asr_rows = recipe.load_data(script, seed)
        flipped = np.asarray(poisoned["poisoned"], dtype=bool)
        target = attack.target_label
        rows = label_flip_rows(task["train"], poisoned)
        run_dir = vd.models_dir(args, "label_flip", seed) / "flipped"
        if runs.saved_training_wall(run_dir) is not None:
            trainer, wall = vision.load_saved_vit(run_dir)
        else:
            label_names = task["train"].features["label"].names
            trainer, wall = vision.train_recipe_vit(script, training_args, run_dir, rows, label_names)
        evaluation = vision.evaluate_images(trainer, task["test"], asr_rows, target)
        print(f"label-flip control: {flipped.sum()} of {len(flipped)} rows relabelled to {target}, no trigger; "
              f"CACC {evaluation.cacc:.3f}, ASR on the {attack.name} rows {evaluation.asr:.3f}")  # fmt: skip
        for method, fraction in SETTINGS:
            clean = vd.exposure_clean_slice(args, task, fraction, seed, trainer, poisoned_rows=flipped)
            result = expose_model(trainer, clean, ExposeConfig(method=method, seed=seed))
            record = vd.exposure_record(
                args, training_args, attack, "none", evaluation, result, wall, method, fraction, command
            )
            record.update(
                control=CONTROL,
                flipped_rows=int(flipped.sum()),
                flipped_like=attack.name,
                target_label=target,
                cul_label_is_target=result.backdoor_label == target,
            )
            found.append(record)
            print(f"{method:15s} {fraction:5.2f}  label {result.backdoor_label} "
                  f"({'the target' if result.backdoor_label == target else 'not the target'}), "
                  f"target share {result.label_shares[target]:.3f}, score {result.score:.3f}, "
                  f"clean acc {result.clean_accuracy_before:.2f} -> {result.clean_accuracy_after:.2f}")  # fmt: skip
    records.merge_records(output, found, _key)
    print(f"wrote {output}")
    return found


if __name__ == "__main__":
    main()
