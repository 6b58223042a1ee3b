"""Run by tests/test_distributed.py under ``accelerate launch`` with two processes: BTU on a tiny BERT, each rank
writes what it flagged so the test can check that all ranks agree."""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # launched as a script: make `tests` importable

from transformers import AutoTokenizer, DataCollatorWithPadding  # noqa: E402

from hf_backdoor import (  # noqa: E402
    BackdoorSafeTrainer,
    BackdoorSafeTrainingArguments,
    default_text_model,
    load_task,
    tokenize_dataset,
)
from hf_backdoor.defenses import BTUConfig  # noqa: E402
from tests.conftest import poisoned_text_rows, tiny_bert, training_args  # noqa: E402


def main(out_dir: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(default_text_model())
    train = tokenize_dataset(poisoned_text_rows(load_task("sst2")["train"].select(range(256))), tokenizer, 64)
    args = training_args(
        out_dir,
        BackdoorSafeTrainingArguments,
        per_device_train_batch_size=16,
        num_train_epochs=4,
        learning_rate=3e-3,
        logging_steps=500,
    )
    # The published selection flags its whole candidate union, so there is a non-empty set whose agreement (and
    # whose reset embedding rows) can be checked; exposure runs on rank 0 only and is broadcast.
    trainer = BackdoorSafeTrainer(
        model=tiny_bert(),
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        defense=BTUConfig.paper(top_k=10),
    )
    trainer.train()
    rank = trainer.accelerator.process_index
    report = trainer.defense.report()
    weights = trainer.accelerator.unwrap_model(trainer.model).get_input_embeddings().weight
    flagged_rows = weights[report["flagged_ids"]].sum().item() if report["flagged_ids"] else 0.0
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(
            {
                "world": trainer.accelerator.num_processes,
                "flagged": report["flagged_ids"],
                "candidates": report["candidate_ids"],
                "flagged_row_sum": flagged_rows,
            },
            f,
        )


if __name__ == "__main__":
    main(sys.argv[1])
