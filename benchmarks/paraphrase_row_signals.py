"""Do representation-space signals separate paraphrase-poisoned rows? kNN label agreement on the pretrained encoder,
and activation clustering and spectral signatures on the model as plain fine-tuning learns the backdoor.

    python benchmarks/paraphrase_row_signals.py --dataset sst2 --attack syntactic --poison-rate 0.2

The training-time defenses of ``benchmarks/paraphrase_defenses.py`` score rows by how the model fits them (loss,
a shallow expert's confidence). This script asks whether three published *representation* signals do better, with
no defense in the loop (a plain ``Trainer`` run on the poisoned rows; the recipe of ``paraphrase_defenses.py``):

- **kNN label agreement** on the pretrained encoder (before any fine-tuning), at every layer: the share of a row's
  ``--knn`` nearest rows (cosine, mean-pooled hidden states) that carry its label. A dirty-label poisoned row is a
  text of another class, so its semantic neighbours should carry another label (Peri et al., "Deep k-NN Defense
  against Clean-label Data Poisoning Attacks", ECCV Workshops 2020). Also the difference of agreement at layer 0
  (surface form) and at the last layer (meaning).
- **Activation clustering** (Chen et al., "Detecting Backdoor Attacks on Deep Neural Networks by Activation
  Clustering", SafeAI 2019): within the target label's rows, the last layer's mean-pooled representations reduced to
  10 PCA components and split in two by k-means; the smaller cluster is flagged. Scored as the AUROC of the distance
  margin to the two centroids and the flagged cluster's precision and recall.
- **Spectral signatures** (Tran et al., "Spectral Signatures in Backdoor Attacks", NeurIPS 2018): within the target
  label's rows, the squared projection on the top singular vector of the centred representations.
- **Meaning-probe disagreement** on the pretrained encoder (a confident-learning reading, Northcutt et al., "Confident
  Learning: Estimating Uncertainty in Dataset Labels", JAIR 2021): a logistic regression on the last layer's
  mean-pooled states, cross-fitted over 5 folds; the signal is one minus its out-of-fold probability of the row's
  label. Also on the same texts with their words shuffled (seeded), which keeps the words and drops the word order
  that a syntactic template lives in.
- **Word-order sensitivity** during plain fine-tuning: the row's log-probability of its label minus that of the
  same words in a shuffled order. A syntactic trigger is an order, so a row whose label rests on the template should
  lose its label when the order goes.

The training-time signals are measured at the fractions of training in ``--at`` (in epochs). Each record is one
signal at one point, with the plain run's CACC and ASR beside it; records go to
``benchmarks/results/paraphrase_row_signals.json`` (same dataset, attack, rate, training size, seed,
signal and point replaced).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from transformers import AutoModel, DataCollatorWithPadding, Trainer, TrainerCallback, set_seed

from hf_backdoor import default_text_model, load_task, make_asr_dataset, poison_dataset
from hf_backdoor.data import get_task_spec
from hf_backdoor.metrics import evaluate_backdoor, roc_auc
from hf_backdoor.models import load_text_classifier, load_text_tokenizer, model_display_name, tokenize_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: benchmarks/ is not installed
from benchmarks.paraphrase_defenses import _attack as attack_config  # noqa: E402
from benchmarks.paraphrase_defenses import _training_args as reference_training_args  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "paraphrase_row_signals.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="sst2")
    parser.add_argument("--attack", default="syntactic")
    parser.add_argument("--poison-rate", type=float, default=0.2)
    parser.add_argument("--max-train-samples", type=int, default=2000)
    parser.add_argument("--epochs", type=float, default=3.0)
    parser.add_argument("--at", default="0.25,0.5,1,3", help="epochs at which the training-time signals are read")
    parser.add_argument("--knn", type=int, default=20, help="neighbours of the kNN label agreement")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output-dir", default="/tmp/paraphrase_row_signals")
    parser.add_argument("--output", default=str(RESULTS))
    parser.add_argument("--no-save", action="store_true")
    return parser.parse_args(argv)


def pooled_states(encoder, features, collator, batch_size: int = 128) -> torch.Tensor:
    """Mean-pooled hidden states of every layer (embeddings first): ``[layers + 1, rows, hidden]``."""
    was_training = encoder.training
    encoder.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            batch = collator([features[i] for i in range(start, min(start + batch_size, len(features)))])
            hidden = encoder(**batch, output_hidden_states=True).hidden_states
            mask = batch["attention_mask"].unsqueeze(-1).float()
            chunks.append(torch.stack([(h * mask).sum(1) / mask.sum(1) for h in hidden]))
    encoder.train(was_training)
    return torch.cat(chunks, dim=1)


def knn_label_agreement(states: torch.Tensor, labels: np.ndarray, k: int) -> np.ndarray:
    """Per row: the share of its ``k`` nearest other rows (cosine) that carry its label."""
    unit = torch.nn.functional.normalize(states, dim=-1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-2.0)
    neighbours = similarity.topk(k, dim=1).indices.numpy()
    return (labels[neighbours] == labels[:, None]).mean(axis=1)


def cluster_signals(states: np.ndarray, poisoned: np.ndarray, seed: int) -> dict[str, float]:
    """Activation clustering and spectral signatures within one label's rows, scored against ``poisoned``."""
    centred = states - states.mean(axis=0)
    top = np.linalg.svd(centred, full_matrices=False)[2][0]
    reduced = PCA(10, random_state=seed).fit_transform(centred)
    kmeans = KMeans(2, n_init=10, random_state=seed).fit(reduced)
    small = int(np.argmin(np.bincount(kmeans.labels_)))
    flagged = kmeans.labels_ == small
    distances = kmeans.transform(reduced)
    return {
        "spectral_auroc": roc_auc((centred @ top) ** 2, poisoned),
        "ac_auroc": roc_auc(distances[:, 1 - small] - distances[:, small], poisoned),
        "ac_precision": float(poisoned[flagged].mean()) if flagged.any() else 0.0,
        "ac_recall": float(flagged[poisoned].mean()),
        "ac_flagged": int(flagged.sum()),
    }


def shuffled_words(texts: list[str], seed: int) -> list[str]:
    """Each text with its whitespace-separated words in a seeded random order."""
    rng = np.random.default_rng(seed)
    return [" ".join(np.array(t.split())[rng.permutation(len(t.split()))].tolist()) for t in texts]


def probe_disagreement(states: torch.Tensor, labels: np.ndarray, seed: int) -> np.ndarray:
    """One minus a cross-fitted linear probe's out-of-fold probability of each row's label."""
    unit = torch.nn.functional.normalize(states, dim=-1).numpy()
    standard = (unit - unit.mean(0)) / (unit.std(0) + 1e-6)
    folds = StratifiedKFold(5, shuffle=True, random_state=seed)
    probe = LogisticRegression(C=0.01, max_iter=3000)
    probabilities = cross_val_predict(probe, standard, labels, cv=folds, method="predict_proba")
    return 1.0 - probabilities[np.arange(len(labels)), labels]


def label_log_probs(model, features, collator, labels: np.ndarray, batch_size: int = 128) -> np.ndarray:
    """The model's log-probability of each row's label."""
    was_training = model.training
    model.eval()
    chunks = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            batch = collator([features[i] for i in range(start, min(start + batch_size, len(features)))])
            chunks.append(torch.log_softmax(model(**batch).logits.float(), dim=-1))
    model.train(was_training)
    return torch.cat(chunks).numpy()[np.arange(len(labels)), labels]


class _SignalsAt(TrainerCallback):
    def __init__(self, points, epochs, read):
        self.points, self.epochs, self.read, self.done = sorted(points), epochs, read, set()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        epoch = state.global_step * self.epochs / state.max_steps
        for point in self.points:
            if point not in self.done and epoch >= point - 1e-9:
                self.done.add(point)
                self.read(point, model)


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    model_name = default_text_model()
    tokenizer = load_text_tokenizer(model_name)
    task = load_task(args.dataset)
    train = task["train"].shuffle(seed=args.seed).select(range(min(args.max_train_samples, len(task["train"]))))
    target = get_task_spec(args.dataset).default_target_label
    attack = attack_config(args.attack, args.dataset, args.poison_rate, args.seed)
    rows = poison_dataset(train, attack, tokenizer=tokenizer)
    labels = np.asarray(rows["label"])
    poisoned = np.asarray(rows["poisoned"]).astype(bool)
    same = labels == target
    data = tokenize_dataset(rows, tokenizer, args.max_length)
    features = data.select_columns(
        [c for c in ("input_ids", "attention_mask", "token_type_ids") if c in data.column_names]
    )
    shuffled_rows = rows.remove_columns("text").add_column("text", shuffled_words(rows["text"], args.seed))
    shuffled_data = tokenize_dataset(shuffled_rows, tokenizer, args.max_length)
    shuffled_features = shuffled_data.select_columns(features.column_names)
    collator = DataCollatorWithPadding(tokenizer)
    command = "python " + shlex.join(
        ["benchmarks/paraphrase_row_signals.py", *(sys.argv[1:] if argv is None else argv)]
    )
    common = dict(
        dataset=args.dataset,
        attack=attack.name,
        defense="none",
        model=model_display_name(model_name),
        poison_rate=args.poison_rate,
        num_poisoned=int(poisoned.sum()),
        num_train=len(rows),
        device=f"cpu ({torch.get_num_threads()} threads)",
        seed=args.seed,
        epochs=args.epochs,
        overhead=None,
        command=command,
    )
    found: list[dict] = []

    start = time.perf_counter()
    encoder = AutoModel.from_pretrained(model_name)
    states = pooled_states(encoder, features, collator)
    knn_s = time.perf_counter() - start
    agreement = [knn_label_agreement(layer, labels, args.knn) for layer in states]
    for layer, agree in enumerate(agreement):
        found.append(
            {
                "signal": f"knn_disagreement_layer{layer}",
                "at_epoch": 0.0,
                "auroc": roc_auc(-agree, poisoned),
                "auroc_same_label": roc_auc(-agree[same], poisoned[same]),
                "signal_s": round(knn_s, 1),
            }
        )
    surface_minus_meaning = agreement[0] - agreement[-1]
    found.append(
        {
            "signal": "knn_surface_minus_meaning",
            "at_epoch": 0.0,
            "auroc": roc_auc(surface_minus_meaning, poisoned),
            "auroc_same_label": roc_auc(surface_minus_meaning[same], poisoned[same]),
            "signal_s": round(knn_s, 1),
        }
    )

    began = time.perf_counter()
    shuffled_last = pooled_states(encoder, shuffled_features, collator)[-1]
    for signal, last in (("probe_disagreement", states[-1]), ("probe_disagreement_shuffled", shuffled_last)):
        disagreement = probe_disagreement(last, labels, args.seed)
        found.append(
            {
                "signal": signal,
                "at_epoch": 0.0,
                "auroc": roc_auc(disagreement, poisoned),
                "auroc_same_label": roc_auc(disagreement[same], poisoned[same]),
                "signal_s": round(time.perf_counter() - began, 1),
            }
        )

    def read(point, model):
        began = time.perf_counter()
        last = pooled_states(model.base_model, features, collator)[-1].numpy()
        signals = cluster_signals(last[same], poisoned[same], args.seed)
        found.append({"signal": "representation_clusters", "at_epoch": point, **signals,
                      "signal_s": round(time.perf_counter() - began, 1)})  # fmt: skip
        began = time.perf_counter()
        drop = label_log_probs(model, features, collator, labels) - label_log_probs(
            model, shuffled_features, collator, labels
        )
        found.append(
            {
                "signal": "word_order_sensitivity",
                "at_epoch": point,
                "auroc": roc_auc(drop, poisoned),
                "auroc_same_label": roc_auc(drop[same], poisoned[same]),
                "signal_s": round(time.perf_counter() - began, 1),
            }
        )
        print(f"epoch {point:g}: {signals}; word-order AUROC {found[-1]['auroc']:.3f}", flush=True)

    set_seed(args.seed)
    model, _ = load_text_classifier(model_name, train.features["label"].names)
    # logging_steps does not shape the weights: the plain run is the one paraphrase_defenses.py trains.
    training_args = reference_training_args(args, Path(args.output_dir))
    points = [float(p) for p in args.at.split(",") if p.strip()]
    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=data,
        processing_class=tokenizer,
        data_collator=collator,
        callbacks=[_SignalsAt(points, args.epochs, read)],
    )
    started = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - started
    test = tokenize_dataset(task["test"], tokenizer, args.max_length)
    asr_rows = tokenize_dataset(make_asr_dataset(task["test"], attack), tokenizer, args.max_length)
    evaluation = evaluate_backdoor(trainer, test, asr_rows, target)
    records = [
        {**common, **r, "cacc": evaluation.cacc, "asr": evaluation.asr, "asr_floor": None, "wall_s": round(wall, 1)}
        for r in found
    ]
    print(
        f"\n{args.dataset} {attack.name} {args.poison_rate:g}: plain CACC {evaluation.cacc:.3f} ASR {evaluation.asr:.3f}"
    )
    print(f"{'signal':<30}{'epoch':>6}{'AUROC':>8}{'same-label':>11}{'AC P/R':>14}")
    for r in records:
        same_label = "-" if r.get("auroc_same_label") is None else f"{r['auroc_same_label']:.3f}"
        auroc = r.get("auroc", r.get("ac_auroc"))
        pr = f"{r['ac_precision']:.2f}/{r['ac_recall']:.2f}" if "ac_precision" in r else "-"
        print(f"{r['signal']:<30}{r['at_epoch']:>6g}{auroc:>8.3f}{same_label:>11}{pr:>14}")
        if "spectral_auroc" in r:
            print(f"{'spectral_signature':<30}{r['at_epoch']:>6g}{r['spectral_auroc']:>8.3f}")
    if not args.no_save:
        output = Path(args.output)
        existing = json.loads(output.read_text()) if output.exists() else []

        def key(r):
            return tuple(
                r.get(k) for k in ("dataset", "attack", "poison_rate", "num_train", "seed", "signal", "at_epoch")
            )

        replaced = {key(r) for r in records}
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps([r for r in existing if key(r) not in replaced] + records, indent=1) + "\n")
        print(f"wrote {output}")
    return records


if __name__ == "__main__":
    main()
