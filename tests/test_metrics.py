import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score, precision_score, recall_score, roc_auc_score

from hf_backdoor.metrics import (
    METRIC_MODULES,
    attack_success_rate,
    clean_accuracy,
    compute_classification_metrics,
    detection_metrics,
    load_metric,
    roc_auc,
)


def test_auroc_matches_sklearn_with_ties():
    rng = np.random.default_rng(0)
    for _ in range(5):
        labels = rng.integers(0, 2, 300)
        scores = rng.integers(0, 6, 300) + labels * rng.random(300)  # many ties, some signal
        assert roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores))


def test_detection_metrics_match_sklearn():
    rng = np.random.default_rng(1)
    truth = rng.integers(0, 2, 200)
    flagged = np.where(rng.random(200) < 0.8, truth, 1 - truth)
    out = detection_metrics(flagged, truth, scores=flagged + rng.random(200) * 0.1)
    assert out["precision"] == pytest.approx(precision_score(truth, flagged))
    assert out["recall"] == pytest.approx(recall_score(truth, flagged))
    assert out["f1"] == pytest.approx(f1_score(truth, flagged))
    assert 0.75 < out["auroc"] < 0.85


def test_nothing_flagged_gives_zero_precision_not_nan():
    out = detection_metrics([0, 0, 0], [1, 0, 0])
    assert out == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "num_flagged": 0, "num_positive": 1}


def test_cacc_asr_and_errors():
    assert clean_accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
    assert attack_success_rate([2, 2, 0, 1], target_label=2) == 0.5
    with pytest.raises(ValueError, match="3 predictions for 2 references"):
        clean_accuracy([1, 0, 1], [1, 0])
    with pytest.raises(ValueError, match="both positive and negative"):
        roc_auc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="empty"):
        attack_success_rate([], 1)


def test_compute_metrics_for_trainer():
    from transformers import EvalPrediction

    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0]])
    assert compute_classification_metrics(EvalPrediction(logits, np.array([0, 1, 1]))) == {"accuracy": 2 / 3}


def test_evaluate_modules_load_offline():
    assert set(METRIC_MODULES) == {"clean_accuracy", "attack_success_rate", "backdoor_detection"}
    assert load_metric("clean_accuracy").compute(predictions=[1, 0, 1], references=[1, 1, 1]) == {"cacc": 2 / 3}
    asr = load_metric("attack_success_rate")
    asr.add_batch(predictions=[1, 1])
    asr.add_batch(predictions=[0, 1])
    assert asr.compute(target_label=1) == {"asr": 0.75}
    det = load_metric("backdoor_detection").compute(
        predictions=[1, 0, 1, 0], references=[1, 0, 0, 1], scores=[0.9, 0.1, 0.8, 0.3]
    )
    assert det["precision"] == 0.5 and det["auroc"] == 0.75
    with pytest.raises(ValueError, match="Unknown metric 'accuracy'"):
        load_metric("accuracy")


class _FirstWordParity(torch.nn.Module):
    """Label = parity of the row's first word piece: a prediction that differs between rows of the same length."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(1))  # the Trainer reads a device and dtype off a parameter

    def forward(self, input_ids, attention_mask=None, labels=None, **_):
        odd = (input_ids[:, 1] % 2).float()
        out = {"logits": torch.stack([1.0 - odd, odd], dim=1) + 0 * self.unused}
        if labels is not None:
            out["loss"] = torch.nn.functional.cross_entropy(out["logits"], labels)
        return out


def test_predict_labels_are_in_row_order(tmp_path, sst2, tokenizer):
    """``predict_labels`` (CACC and ASR everywhere) runs the Trainer on rows sorted by length; each row still gets
    its own prediction."""
    from transformers import Trainer

    from hf_backdoor import tokenize_dataset
    from hf_backdoor.metrics import predict_labels
    from tests.conftest import text_trainer

    rows = tokenize_dataset(sst2["validation"].select(range(48)), tokenizer, max_length=48)
    assert len(set(map(len, rows["input_ids"]))) > 5  # lengths vary, so the order really changes
    expected = [ids[1] % 2 for ids in rows["input_ids"]]
    assert 0 < sum(expected) < len(expected)
    trainer = text_trainer(
        tmp_path, rows, tokenizer, cls=Trainer, model=_FirstWordParity(), args={"per_device_eval_batch_size": 8}
    )
    assert predict_labels(trainer, rows).tolist() == expected


def test_length_order_sorts_token_rows_and_in_row_order_undoes_it():
    import datasets

    from hf_backdoor.data.rows import in_row_order, length_order

    rows = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3], [1], [1, 2], [4], [1, 2, 3, 4]]})
    order = length_order(rows)
    assert order.tolist() == [1, 3, 2, 0, 4]  # stable: the two one-token rows keep their order
    lengths = np.array([len(ids) for ids in rows.select(order)["input_ids"]])
    assert in_row_order(lengths, order).tolist() == [3, 1, 2, 1, 4]
    # Rows whose model inputs a transform makes on the fly, or with no token ids, are predicted as they are.
    assert length_order(rows.with_transform(lambda batch: batch)) is None
    assert length_order(datasets.Dataset.from_dict({"pixel_values": [[0.0]]})) is None
    assert in_row_order(lengths, None) is lengths


def test_evaluate_backdoor_reads_the_asr_rows_without_their_trigger(tmp_path, sst2, tokenizer, caplog):
    """``asr_untriggered``: the model's rate of the target label on the clean rows the ASR rows were made from,
    matched by ``row_index`` (not by position), and left unmeasured where the rows cannot be matched safely."""
    from transformers import Trainer

    from hf_backdoor import BadNetConfig, make_asr_dataset, tokenize_dataset
    from hf_backdoor.data import add_row_index
    from hf_backdoor.metrics import evaluate_backdoor
    from tests.conftest import text_trainer

    split = add_row_index(sst2["validation"].select(range(64)))
    clean = tokenize_dataset(split, tokenizer, max_length=48)
    asr = tokenize_dataset(make_asr_dataset(split, BadNetConfig(triggers=("cf",), target_label=1)), tokenizer, 48)
    trainer = text_trainer(tmp_path, clean, tokenizer, cls=Trainer, model=_FirstWordParity())
    # The parity model's prediction of a clean row is its first word piece's parity: what the ASR rows' originals
    # are labelled without the trigger is known without the model.
    parity = {i: ids[1] % 2 for i, ids in zip(clean["row_index"], clean["input_ids"])}
    expected = float(np.mean([parity[i] == 1 for i in asr["row_index"]]))
    assert 0 < expected < 1 and len(asr) < len(clean)

    assert evaluate_backdoor(trainer, clean, asr).asr_untriggered == pytest.approx(expected)
    shuffled = clean.shuffle(seed=0)
    assert evaluate_backdoor(trainer, shuffled, asr).asr_untriggered == pytest.approx(expected)

    caplog.set_level("INFO", logger="hf_backdoor.metrics.evaluation")
    assert evaluate_backdoor(trainer, clean.remove_columns("row_index"), asr).asr_untriggered is None
    held_out = [i for i, label in zip(clean["row_index"], clean["label"]) if label == 0][:3]
    subset = clean.filter(lambda i: i not in held_out, input_columns="row_index")
    assert evaluate_backdoor(trainer, subset, asr).asr_untriggered is None
    assert "3 of the ASR set's" in caplog.text
    # Ids that number another split: the same row_index values, other rows (their labels give it away).
    other = tokenize_dataset(add_row_index(sst2["test"].select(range(64))), tokenizer, max_length=48)
    assert (np.asarray(other["label"])[asr["row_index"]] != np.asarray(asr["orig_label"])).any()
    assert evaluate_backdoor(trainer, other, asr).asr_untriggered is None
    assert "ids number another split" in caplog.text
