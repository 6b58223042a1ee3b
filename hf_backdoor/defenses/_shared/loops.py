"""The training loops the repairs share: one cross-entropy epoch (descent or ascent), plain SGD fine-tuning, and
clean unlearning by gradient ascent with its stop rule. Imports no defense module."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from .context import SanitizeContext


def cross_entropy_epoch(
    context: SanitizeContext,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    epoch: int,
    sign: float = 1.0,
    scale: float = 1.0,
    max_grad_norm: float | None = None,
    after_step: Callable[[], None] | None = None,
    stop_fn: Callable[[], bool] | None = None,
) -> tuple[float, float]:
    """One epoch over ``fit`` minimising ``sign * scale * CE`` (``sign=-1``: gradient ascent).

    ``stop_fn``, called after every step, ends the epoch early when it returns true. Returns the epoch's mean CE and
    its running accuracy (as the official codes report them).
    """
    model.train()
    total_loss = correct = seen = 0
    for batch in context.loader("train", batch_size, shuffle=True, epoch=epoch):
        inputs, labels = context.split_batch(batch)
        logits, _ = context.logits(model, inputs)
        loss = nn.functional.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        (sign * scale * loss).backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_grad_norm)
        optimizer.step()
        if after_step is not None:
            after_step()
        total_loss += loss.item() * len(labels)
        correct += int((logits.detach().argmax(-1) == labels).sum())
        seen += len(labels)
        if stop_fn is not None and stop_fn():
            model.train()  # stop_fn may evaluate the model
            break
    return total_loss / max(seen, 1), correct / max(seen, 1)


def sgd_finetune(
    context: SanitizeContext,
    model: nn.Module,
    *,
    epochs: int,
    learning_rate: float,
    momentum: float,
    weight_decay: float,
    batch_size: int,
    nesterov: bool = False,
    desc: str = "fine-tuning",
) -> list[dict]:
    """Plain SGD fine-tuning on ``fit``; returns one record per epoch with the held-out clean accuracy."""
    optimizer = torch.optim.SGD(
        model.parameters(), lr=learning_rate, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov
    )
    history = []
    for epoch in context.progress(range(epochs), desc):
        loss, train_acc = cross_entropy_epoch(context, model, optimizer, batch_size, epoch)
        history.append(
            {"epoch": epoch + 1, "loss": loss, "train_accuracy": train_acc, "holdout_accuracy": context.accuracy(model)}
        )
    return history


def collapse_level(labels: np.ndarray) -> float:
    """The accuracy of a constant prediction of the majority class: where a model that lost the task lands."""
    return float(np.bincount(labels).max() / max(len(labels), 1))


def clean_threshold_for(official: float, labels: np.ndarray) -> float:
    """An unlearning stop threshold set for CIFAR-10 (10 balanced classes, collapse at 0.10) carried over to these
    labels: the same relative position between the collapse level ``c`` and perfect accuracy,
    ``c + (official - 0.1) / 0.9 * (1 - c)``. CIFAR-10 gets the official value back; on a balanced binary task RNP's
    0.20 becomes 0.556 and TSBD's 0.10 becomes 0.5 (a collapsed binary model sits at 0.5 and can never reach 0.2
    without learning the inverted task).
    """
    c = collapse_level(labels)
    return c + (official - 0.1) / 0.9 * (1 - c)


def unlearn(
    context: SanitizeContext,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    batch_size: int,
    max_epochs: int,
    clean_threshold: float,
    stop_on: str,
    max_grad_norm: float | None = None,
    scheduler=None,
    desc: str = "unlearning",
) -> list[dict]:
    """Gradient ascent on the clean CE until the clean accuracy is ``<= clean_threshold``.

    ``stop_on``: ``"running"`` reads the epoch's running training accuracy (RNP's code); ``"fit"`` re-evaluates the
    fit rows after each epoch (TSBD's code); ``"step"`` re-evaluates them after every step, so the ascent stops at the
    first step that gets there instead of running on to the end of the epoch. Raises ``RuntimeError`` with the
    accuracy reached if ``max_epochs`` pass without getting there: continuing would hand a model that still solves
    the task to the next stage.
    """
    history = []
    reached = float("nan")
    stop_fn = None
    if stop_on == "step":

        def stop_fn():
            return context.accuracy(model, "fit") <= clean_threshold

    for epoch in context.progress(range(max_epochs), desc):
        loss, running_acc = cross_entropy_epoch(
            context,
            model,
            optimizer,
            batch_size,
            epoch,
            sign=-1.0,
            max_grad_norm=max_grad_norm,
            stop_fn=stop_fn,
        )
        if scheduler is not None:
            scheduler.step()
        record = {"epoch": epoch + 1, "loss": loss, "train_accuracy": running_acc}
        if stop_on in ("fit", "step"):
            record["fit_accuracy"] = context.accuracy(model, "fit")
        record["holdout_accuracy"] = context.accuracy(model)
        history.append(record)
        if not np.isfinite(loss):
            raise RuntimeError(f"Unlearning diverged at epoch {epoch + 1} (loss {loss}); lower the unlearning lr.")
        reached = record["fit_accuracy"] if stop_on in ("fit", "step") else running_acc
        if reached <= clean_threshold:
            return history
    raise RuntimeError(
        f"Clean unlearning did not bring the clean accuracy to <= {clean_threshold:.3f} within {max_epochs} epochs "
        f"(last: {reached:.3f}, held-out {history[-1]['holdout_accuracy']:.3f}). Raise the unlearning learning rate "
        "or its epochs; the model was left untouched."
    )
