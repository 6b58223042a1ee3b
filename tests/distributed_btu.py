"""Run by tests/test_distributed.py under ``accelerate launch --num_processes 2 --cpu``: BTU on a tiny BERT, each
rank writes what it flagged so the test can check that all ranks agree."""

import json
import os
import sys

import torch
from transformers import BertConfig, BertForSequenceClassification, DataCollatorWithPadding

from hf_backdoor import (
    BackdoorSafeTrainer,
    BackdoorSafeTrainingArguments,
    BadNetConfig,
    default_text_model,
    load_task,
    poison_dataset,
    tokenize_dataset,
)
from hf_backdoor.defenses import BTUConfig


def main(out_dir: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_text_model())
    rows = load_task("sst2")["train"].select(range(256))
    train = tokenize_dataset(poison_dataset(rows, BadNetConfig(triggers=("cf",), poison_rate=0.2)), tokenizer, 64)
    torch.manual_seed(0)
    model = BertForSequenceClassification(
        BertConfig(
            vocab_size=30522,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            num_labels=2,
        )
    )
    args = BackdoorSafeTrainingArguments(
        output_dir=out_dir,
        per_device_train_batch_size=16,
        num_train_epochs=4,
        use_cpu=True,
        learning_rate=3e-3,
        report_to="none",
        save_strategy="no",
        seed=0,
    )
    # The published selection flags its whole candidate union, so there is a non-empty set whose agreement (and
    # whose reset embedding rows) can be checked; exposure runs on rank 0 only and is broadcast.
    trainer = BackdoorSafeTrainer(
        model=model,
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
