"""``hf-backdoor evaluate``: CACC and ASR of a saved model, with the ASR floor and warnings.

CACC is measured on the test split; ASR on the triggered non-target test rows (those of a `hf-backdoor poison` folder,
or built from the test split with --attack). --floor-model scores a model trained on clean data on the same rows: its
ASR is the floor an ASR must be read against. A warning is printed when CACC is at chance or the model predicts one
class for nearly everything, since the ASR then measures that, not a backdoor.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .common import (
    attack_config,
    check_saved_model_data,
    evaluation_lines,
    label_names,
    load_data,
    load_saved_classifier,
    measure,
    measure_floor,
    prediction_trainer,
    with_floor,
)
from .options import TRIGGERED_SPLIT, DataArguments, FloorArguments, SavedModelArguments, TriggerArguments

NAME = "evaluate"
HELP = "CACC and ASR of a saved model on clean and triggered rows, with the ASR floor"
DESCRIPTION = __doc__.split("\n\n", 1)[1]


@dataclass
class EvaluateArguments:
    output: str | None = field(
        default=None, metadata={"help": "also write the result as JSON to this file (default: print only)"}
    )


DATACLASSES = (SavedModelArguments, FloorArguments, DataArguments, TriggerArguments, EvaluateArguments)


def asr_rows(trigger_args, source, data):
    """The triggered rows the ASR is measured on, and the attack's name."""
    from ..attacks import make_asr_dataset

    if trigger_args.attack:
        return make_asr_dataset(data["test"], attack_config(trigger_args, source)), trigger_args.attack
    if TRIGGERED_SPLIT in data:
        return data[TRIGGERED_SPLIT], source.attack_name
    return None, None


def run(model_args, floor_args, data_args, trigger_args, args, argv=None) -> int:
    from ..hub.run_folder import write_json_atomic
    from ..models import tokenize_dataset

    source = check_saved_model_data(model_args, floor_args, data_args, trigger_args)
    data = load_data(data_args, source, needed_split="test")
    names = label_names(data)
    model, tokenizer = load_saved_classifier(model_args.model, model_args.tokenizer, len(names))
    asr_raw, attack_name = asr_rows(trigger_args, source, data)
    tokenize = lambda split: tokenize_dataset(split, tokenizer, model_args.max_length)  # noqa: E731
    trainer = prediction_trainer(model, tokenizer, model_args.batch_size)
    result = measure(trainer, tokenize(data["test"]), tokenize(asr_raw) if asr_raw is not None else None, len(names))
    floor = measure_floor(floor_args, model_args, data["test"], asr_raw, len(names))
    result = with_floor(result, floor)
    print("\n".join(evaluation_lines(model_args.model, result, attack_name, floor)))
    if args.output:
        from ..hub.evaluations import evaluation_warnings

        out = {**result, "model": model_args.model, "attack": attack_name, "dataset": source.display_name}
        out["warnings"] = evaluation_warnings(result)
        if floor is not None:
            out["floor"] = floor
        write_json_atomic(args.output, out)
    return 0
