"""Two probes of the syntactic trigger's *surface form*, outside the library's defenses: does a meaning-blind
expert or a model that cannot tell function words apart stop it?

    python benchmarks/paraphrase_surface_probes.py --dataset sst2 --attack syntactic --poison-rate 0.2 --probe surface_poe
    python benchmarks/paraphrase_surface_probes.py --dataset sst2 --attack syntactic --poison-rate 0.2 --probe blank_function_words

A HiddenKiller trigger is a syntactic template (``S(SBAR)(,)(NP)(VP)(.)``): on the 2,000-row SST-2 slice at 20%,
99% of the poisoned rows hold a comma against 52% of the clean rows, and 75% of them start with ``if``, ``when`` or
``as``. The template is made of function words, punctuation and their order, the part of a sentence that carries
little of its meaning. Two ways to use that:

- ``surface_poe``: a **bias-only product of experts** (Clark et al., "Don't Take the Easy Way Out: Ensemble Based
  Methods for Avoiding Known Dataset Biases", EMNLP 2019; He et al., "Unlearn Dataset Bias in Natural Language
  Inference by Fitting the Residual", 2019). The expert is a logistic regression on 1-3-grams of the first
  ``--prefix-tokens`` tokens of each row's *skeleton* (function words and punctuation kept, every other word
  replaced by ``_``), cross-fitted over 5 folds so no row is scored by an expert that saw it. Its out-of-fold
  log-probabilities are fixed; the model is trained on ``log_softmax(z) + log p_expert`` and predicts alone.
- ``blank_function_words``: the word embeddings of the function words and punctuation are set to the padding
  token's and frozen, so the model sees *that* a function word stands at a position but not which one; negations
  and degree words (``not``, ``but``, ``too``, ...) are kept, as they carry sentiment. The model is saved as is, so
  the same blanking holds at test time.

The recipe is that of ``paraphrase_defenses.py`` (MiniLM, lr 1e-4, batch 32, 3 epochs, max length 128, a seeded
slice of the training split, full test split). Each run prints and writes one record to
``benchmarks/results/paraphrase_surface_probes.json``: ``defense`` is ``none`` (neither probe is a defense of the
library) and ``probe`` names the change to training; the expert's AUROC against the poisoned rows is recorded for
``surface_poe``. The floor (``asr_floor``) is read from the plain clean run of ``paraphrase_defenses.json`` on the
same slice and recipe (``None`` when there is none); the undefended run is there too.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS, CountVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

from hf_backdoor import default_text_model, load_task, make_asr_dataset, poison_dataset
from hf_backdoor.metrics import evaluate_backdoor, roc_auc
from hf_backdoor.models import load_text_classifier, load_text_tokenizer, model_display_name, tokenize_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: benchmarks/common, not installed
from benchmarks.common.records import command_line, device_name, merge_records  # noqa: E402
from benchmarks.paraphrase_defenses import _attack, _training_args  # noqa: E402  (the same attack and recipe)

PUNCTUATION = {",", ".", "!", "?", ";", ":", "'s", "n't", "--", "-", "'"}
# Kept visible when function words are blanked: they carry sentiment.
SENTIMENT_FUNCTION_WORDS = {
    "no", "not", "nor", "never", "nothing", "none", "nobody", "neither", "cannot", "without", "but", "however",
    "although", "though", "too", "very", "least", "less", "more", "most", "few", "only", "enough", "well",
}  # fmt: skip
BLANKED_PUNCTUATION = {",", ".", ";", ":", "-", "--", "'", "`", "(", ")", "-lrb-", "-rrb-"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="sst2")
    parser.add_argument("--attack", default="syntactic")
    parser.add_argument("--poison-rate", type=float, default=0.2)
    parser.add_argument("--probe", choices=("surface_poe", "blank_function_words"), required=True)
    parser.add_argument("--prefix-tokens", type=int, default=8, help="skeleton tokens the surface expert reads")
    parser.add_argument("--max-train-samples", type=int, default=2000)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-dir", default="/tmp/hf_backdoor_surface_probes")
    parser.add_argument("--output", default="benchmarks/results/paraphrase_surface_probes.json")
    return parser.parse_args(argv)


def skeleton_prefix(text: str, length: int) -> str:
    words = re.findall(r"[\w']+|[^\w\s]", text.lower())[:length]
    return " ".join(w if w in ENGLISH_STOP_WORDS or w in PUNCTUATION else "_" for w in words)


def surface_expert_probs(texts, labels, length: int, seed: int) -> np.ndarray:
    """Out-of-fold class probabilities of a logistic regression on skeleton-prefix 1-3-grams."""
    features = CountVectorizer(ngram_range=(1, 3), min_df=3, token_pattern=r"\S+", binary=True)
    x = features.fit_transform([skeleton_prefix(t, length) for t in texts])
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    return cross_val_predict(LogisticRegression(C=1.0, max_iter=3000), x, labels, cv=folds, method="predict_proba")


class FixedExpertPoETrainer(Trainer):
    """Trains on ``log_softmax(z) + log p_expert`` with the expert's per-row log-probabilities fixed."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        expert_log_probs = inputs.pop("expert_log_probs")
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        joint = torch.log_softmax(outputs.logits.float(), -1) + expert_log_probs
        loss = torch.nn.functional.cross_entropy(joint, labels)
        return (loss, outputs) if return_outputs else loss


def blank_function_words(model, tokenizer) -> int:
    words = (set(ENGLISH_STOP_WORDS) - SENTIMENT_FUNCTION_WORDS) | BLANKED_PUNCTUATION
    ids = sorted({i for i in tokenizer.convert_tokens_to_ids(sorted(words)) if i != tokenizer.unk_token_id})
    embeddings = model.get_input_embeddings().weight
    with torch.no_grad():
        embeddings[ids] = embeddings[tokenizer.pad_token_id].clone()
    keep = torch.ones(embeddings.shape[0], 1)
    keep[ids] = 0
    embeddings.register_hook(lambda grad: grad * keep)  # frozen rows: they stay equal to the padding row
    return len(ids)


def recorded_floor(args, path: str = "benchmarks/results/paraphrase_defenses.json") -> float | None:
    """The clean model's ASR on the same triggered rows, from ``paraphrase_defenses.py``'s records."""
    if not Path(path).exists():
        return None
    for r in json.loads(Path(path).read_text()):
        if (
            r.get("dataset") == args.dataset
            and r.get("attack") == "none"
            and r.get("defense") == "none"
            and r.get("asr_attack") == args.attack
            and r.get("num_train") == args.max_train_samples
            and r.get("seed") == args.seed
            and r.get("epochs") == args.epochs
            and r.get("learning_rate") == args.lr
            and "num_test" not in r
        ):
            return r["asr_floor"]
    return None


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    task = load_task(args.dataset)
    train = task["train"].shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(task["train"]))))
    attack = _attack(args.attack, args.dataset, args.poison_rate, args.seed)
    model_name = default_text_model()
    tokenizer = load_text_tokenizer(model_name)
    rows = poison_dataset(train, attack, tokenizer=tokenizer)
    labels = np.asarray(rows["label"])
    poisoned = np.asarray(rows["poisoned"]).astype(bool)
    record: dict = {}
    set_seed(args.seed)
    model, _ = load_text_classifier(model_name, train.features["label"].names)
    data = tokenize_dataset(rows, tokenizer, 128)
    trainer_cls, columns = Trainer, ["input_ids", "attention_mask", "token_type_ids", "label"]
    if args.probe == "surface_poe":
        probs = surface_expert_probs(rows["text"], labels, args.prefix_tokens, args.seed)
        record["expert_auroc"] = roc_auc(probs[np.arange(len(labels)), labels], poisoned)
        record["expert_clean_accuracy"] = float((probs.argmax(1) == labels)[~poisoned].mean())
        data = data.add_column("expert_log_probs", list(np.log(np.clip(probs, 1e-4, 1.0)).astype(np.float32)))
        trainer_cls, columns = FixedExpertPoETrainer, [*columns, "expert_log_probs"]
    else:
        record["blanked_tokens"] = blank_function_words(model, tokenizer)
    data = data.remove_columns([c for c in data.column_names if c not in columns])
    # The expert's column must reach compute_loss, so the Trainer may not drop the columns the model does not take.
    training_args = _training_args(
        args, Path(args.output_dir), cls=functools.partial(TrainingArguments, remove_unused_columns=False)
    )
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=data,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
    )
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    scorer = Trainer(
        model=trainer.model,
        args=TrainingArguments(output_dir=args.output_dir, per_device_eval_batch_size=128, report_to="none"),
        processing_class=tokenizer,
    )
    test = task["test"]
    result = evaluate_backdoor(
        scorer,
        tokenize_dataset(test, tokenizer, 128),
        tokenize_dataset(make_asr_dataset(test, attack), tokenizer, 128),
        attack.target_label,
    )
    record = {
        "dataset": args.dataset,
        "attack": args.attack,
        "defense": "none",
        "probe": args.probe,
        "model": model_display_name(model_name),
        "poison_rate": args.poison_rate,
        "num_train": len(rows),
        "cacc": result.cacc,
        "asr": result.asr,
        "asr_floor": recorded_floor(args),
        "wall_s": round(wall, 1),
        "overhead": None,
        "device": device_name(),
        "seed": args.seed,
        **record,
        "command": command_line("benchmarks/paraphrase_surface_probes.py", sys.argv[1:] if argv is None else argv),
    }
    print(json.dumps(record))
    key = ("dataset", "attack", "probe", "poison_rate", "num_train", "seed")
    merge_records(Path(args.output), [record], key=lambda r: tuple(r.get(k) for k in key))
    return record


if __name__ == "__main__":
    main()
