"""``hf-backdoor poison``: write a poisoned dataset, with its ground truth and a record of the attack.

The folder holds the poisoned training split (``poisoned`` and ``orig_label`` columns are the ground truth), the clean
splits, ``test_triggered`` (every non-target test row with the trigger, labelled with the target: the ASR rows) and
``poison_config.json`` (the attack), so ``train --dataset <folder>`` names the attack in its card. It is written
atomically (a temporary sibling folder renamed into place) and never into its own input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .common import attack_config, check_dataset, load_data
from .options import TRIGGERED_SPLIT, CommandError, DataArguments, PoisonAttackArguments, TrainDataArguments

NAME = "poison"
HELP = "write a poisoned dataset (with its ground truth) to disk or the Hub"
DESCRIPTION = __doc__.split("\n\n", 1)[1]


@dataclass
class PoisonArguments:
    output: str | None = field(
        default=None,
        metadata={
            "help": "folder to write the dataset to, `save_to_disk` layout (default: none; give it or --push-to-hub)",
            "aliases": ["--output-dir"],
        },
    )
    overwrite: bool = field(default=False, metadata={"help": "replace an existing non-empty --output folder"})
    push_to_hub: str | None = field(
        default=None,
        metadata={
            "help": "also push it as a Hub dataset to this repository id (default: no push)",
            "metavar": "REPO_ID",
        },
    )
    private: bool = field(default=False, metadata={"help": "create the Hub dataset as private"})


DATACLASSES = (TrainDataArguments, PoisonAttackArguments, PoisonArguments)


def run(data_args: DataArguments, attack_args: PoisonAttackArguments, args: PoisonArguments, argv=None) -> int:
    from ..attacks import make_asr_dataset, poison_dataset
    from ..data.saving import save_dataset_dict
    from ..hub.run_folder import make_readable

    if not args.output and not args.push_to_hub:
        raise CommandError("Say where the poisoned dataset goes: --output DIR and/or --push-to-hub REPO_ID.")
    if args.push_to_hub:
        from huggingface_hub import constants

        if constants.is_offline_mode():
            raise CommandError(
                "--push-to-hub: offline mode is on (HF_HUB_OFFLINE=1). Save with --output, then push the folder from a "
                f"machine with network access: `hf upload --repo-type dataset {args.push_to_hub} <folder>`."
            )
    source = check_dataset(data_args.dataset)
    if source.poisoned:
        raise CommandError(f"{data_args.dataset} was written by `hf-backdoor poison` already: poison a clean dataset.")
    attack = attack_config(attack_args, source)  # a bad rate, mode or field fails before the data is read
    if args.output:
        # The same checks save_dataset_dict makes, before the poisoning work rather than after it.
        from pathlib import Path

        output = Path(args.output).expanduser().resolve()
        if source.path is not None:
            input_path = source.path.resolve()
            if output == input_path or input_path in output.parents or output in input_path.parents:
                raise CommandError(
                    f"--output {args.output} is, is inside or contains the input {data_args.dataset}: writing there "
                    "would overwrite the data being read. Choose an output folder outside the input."
                )
        if output.is_dir() and any(output.iterdir()) and not args.overwrite:
            raise CommandError(
                f"--output {args.output} exists and is not empty: choose another folder or pass --overwrite."
            )
    data = load_data(data_args, source)
    if TRIGGERED_SPLIT in data:
        raise CommandError(f"{data_args.dataset} already has a {TRIGGERED_SPLIT} split: poison a clean dataset.")
    if "train" not in data or "test" not in data:
        raise CommandError(f"The dataset needs `train` and `test` splits; it has {sorted(data)}.")
    data["train"] = poison_dataset(data["train"], attack)
    data[TRIGGERED_SPLIT] = make_asr_dataset(data["test"], attack)
    poisoned = int(sum(data["train"]["poisoned"]))
    print(
        f"{attack.name}: poisoned {poisoned} of {len(data['train'])} training rows (target {attack.target_label}, "
        f"{attack.mode}); {TRIGGERED_SPLIT}: {len(data[TRIGGERED_SPLIT])} triggered non-target test rows. "
        "Ground truth in the `poisoned` and `orig_label` columns."
    )
    if args.output:
        kwargs = dict(overwrite=args.overwrite, source_dir=source.path, attack=attack)
        if source.path is None:
            # The task or Hub id the rows came from, so a card trained on the folder names the task, not a path.
            kwargs["source"] = source.display_name
        try:
            saved = save_dataset_dict(data, args.output, **kwargs)
        except FileExistsError as error:
            raise CommandError(str(error)) from None
        make_readable(saved)
        print(f"saved to {args.output} (the attack is recorded in poison_config.json)")
    if args.push_to_hub:
        data.push_to_hub(args.push_to_hub, private=args.private)
        print(f"pushed to https://huggingface.co/datasets/{args.push_to_hub}")
    return 0
