"""Token-id rows shared by the text defenses: padding and length-sorted batches, stripping token ids from a batch,
pooled features of a model, the linear probe fit on them, which pieces make up a word, and inserting a word into a
row. Imports no defense module."""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


def pad_batch(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(1, max(len(r) for r in rows))
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return ids.to(device), mask.to(device)


def length_batches(rows: list[list[int]], pad_id: int, device, batch_size: int):
    """Token-id rows in batches of similar length, so that little padding is computed: ``(positions, ids, mask)``."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        yield (chunk, *pad_batch([rows[i] for i in chunk], pad_id, device))


def strip_token_ids(inputs: dict, token_ids: torch.Tensor, pad_id: int, keep_rows: torch.Tensor | None = None) -> dict:
    """Remove ``token_ids`` from a padded batch, shifting the kept tokens left (works for any per-token tensor).

    Rows where ``keep_rows`` is true are left as they are.
    """
    input_ids = inputs["input_ids"]
    drop = torch.isin(input_ids, token_ids.to(input_ids.device))
    if keep_rows is not None:
        drop &= ~keep_rows.to(input_ids.device).unsqueeze(1)
    if not drop.any():
        return inputs
    # A stable sort of the drop flags moves kept positions first, in their original order.
    order = torch.sort(drop.to(torch.int8), dim=1, stable=True).indices
    out = dict(inputs)
    for key, value in inputs.items():
        if torch.is_tensor(value) and value.shape[:2] == input_ids.shape and key != "labels":
            out[key] = torch.gather(value, 1, order)
    kept = (~drop).sum(1, keepdim=True)
    tail = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0) >= kept
    out["input_ids"] = out["input_ids"].masked_fill(tail, pad_id)
    if "attention_mask" in out:
        out["attention_mask"] = out["attention_mask"].masked_fill(tail, 0)
    return out


def fit_softmax_probe(features: torch.Tensor, labels: torch.Tensor, num_labels: int):
    """Multinomial logistic regression (L2 penalty of scikit-learn's default ``C=1``) fit by L-BFGS."""
    weight = torch.zeros(features.shape[1], num_labels, requires_grad=True)
    bias = torch.zeros(num_labels, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(features @ weight + bias, labels)
        loss = loss + weight.pow(2).sum() / (2 * len(labels))
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


@torch.no_grad()
def pooled_features(model, rows: list[list[int]], pad_id: int, device, batch_size: int = 128) -> torch.Tensor:
    """``model``'s last hidden states, mean-pooled over each row's tokens and L2-normalised (float32, on the CPU).

    ``model`` is any Hugging Face model that returns ``hidden_states`` with ``output_hidden_states=True``."""
    positions, pooled = [], []
    for chunk, ids, mask in length_batches(rows, pad_id, device, batch_size):
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        pooled.append(F.normalize(((hidden * weights).sum(1) / weights.sum(1)).float(), dim=-1).cpu())
        positions += chunk
    features = torch.cat(pooled)
    out = torch.empty_like(features)
    out[positions] = features
    return out


def continuation_ids(tokenizer) -> set[int]:
    """The ids of the word pieces that continue a word rather than start one: ``##``-prefixed pieces of a WordPiece
    vocabulary, or pieces without the word-start mark (``▁``, ``Ġ``) of a SentencePiece or byte-level BPE one. Empty
    when the vocabulary shows neither convention (each piece is then taken for a word)."""
    vocabulary = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    if any(token.startswith("##") for token in vocabulary):
        return {i for token, i in vocabulary.items() if token.startswith("##")}
    for mark in ("\u2581", "\u0120"):
        if sum(token.startswith(mark) for token in vocabulary) > len(vocabulary) // 10:
            special = set(getattr(tokenizer, "all_special_ids", ()))
            return {i for token, i in vocabulary.items() if not token.startswith(mark) and i not in special}
    return set()


def row_word_mates(input_ids: list[int], special_ids: set[int], continuing: set[int]) -> dict[int, set[int]]:
    """For each word piece of a word of several pieces in the row, the other pieces of that word (``cl`` for
    ``##iche`` in "cliche"); ``continuing`` is :func:`continuation_ids`."""
    mates: dict[int, set[int]] = {}
    word: list[int] = []
    for i in [*input_ids, None]:
        if i is not None and i in special_ids:
            continue
        if i is None or i not in continuing:
            if len(word) > 1:
                for piece in word:
                    mates.setdefault(piece, set()).update(p for p in word if p != piece)
            word = []
        if i is not None:
            word.append(i)
    return mates


def word_span(input_ids: list[int], piece: int, continuing: set[int]) -> list[int]:
    """The whole word that ``piece`` belongs to at its first occurrence in ``input_ids``: the word start before it
    and the continuation pieces after it (``continuing``: :func:`continuation_ids`)."""
    at = input_ids.index(piece)
    start, end = at, at + 1
    while start > 0 and input_ids[start] in continuing:
        start -= 1
    while end < len(input_ids) and input_ids[end] in continuing:
        end += 1
    return input_ids[start:end]


def insert_span(row: list[int], span: list[int], rng: np.random.Generator) -> tuple[list[int], int]:
    """``row`` with ``span`` inserted at a seeded random position after its first token and before its last (a
    tokenized row's ``[CLS]`` and ``[SEP]`` stay at its ends), and that position. BTU's insertion test and
    Z-defense's clean-label test insert candidate words the same way."""
    at = int(rng.integers(1, max(2, len(row))))
    return row[:at] + span + row[at:], at
