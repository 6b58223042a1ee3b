"""Run by tests/test_distributed.py under ``torchrun`` with FSDP requested in the training arguments: builds a
``BackdoorSafeTrainer`` with BTU (which reads and rewrites the whole word-embedding matrix) and records, per rank,
whether FSDP is on and whether the trainer refused to be built. It never trains."""

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # launched as a script: make `tests` importable

import torch  # noqa: E402
from accelerate.state import AcceleratorState  # noqa: E402
from transformers import AutoTokenizer, DataCollatorWithPadding  # noqa: E402

from hf_backdoor import BackdoorSafeTrainer, default_text_model, load_task, tokenize_dataset  # noqa: E402
from hf_backdoor.defenses import BTUConfig  # noqa: E402
from tests.conftest import tiny_bert, training_args  # noqa: E402


def main(out_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_text_model())
    train = tokenize_dataset(load_task("sst2")["train"].select(range(64)), tokenizer, 32)
    args = training_args(out_dir, fsdp=True, fsdp_config={"fsdp_version": 2}, use_cpu=not torch.cuda.is_available())
    start = time.perf_counter()
    record = {"refused": None}
    try:
        BackdoorSafeTrainer(
            model=tiny_bert(),
            args=args,
            train_dataset=train,
            processing_class=tokenizer,
            data_collator=DataCollatorWithPadding(tokenizer),
            defense=BTUConfig(),
        )
    except ValueError as error:
        record["refused"] = str(error)
    state = AcceleratorState()  # the trainer's accelerator set it up, refused or not
    record.update(
        seconds=time.perf_counter() - start,
        world=state.num_processes,
        distributed_type=state.distributed_type.value,
        fsdp_enabled=getattr(state, "fsdp_plugin", None) is not None,
    )
    with open(os.path.join(out_dir, f"rank{state.process_index}.json"), "w") as f:
        json.dump(record, f)


if __name__ == "__main__":
    main(sys.argv[1])
