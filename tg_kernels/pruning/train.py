"""`prune`: the recommended schedule in one call: gate, train towards a budget, fine-tune, export.

The long-hand loop (``attach_gates``, ``Budget``, your optimiser, ``export``) stays available and
documented in the README; this helper runs the schedule that reaches its target on the digits
benchmark (``bench/digits_budget.py``):

1. **gate search**: task loss plus an adaptive :class:`~tg_kernels.Budget`; Adam moves the gate
   weights (their learning rate cosine-annealed over ``gate_epochs`` so that the ratio settles) and
   the model's own weights together, in skip mode ``"exact"`` (the same gradients as dense, closed
   gates included, so closed channels can reopen). It runs ``gate_epochs`` epochs (stopping inside
   the last one at the first step whose ratio is within ``tol`` of the target); then
   :meth:`Budget.settle` makes the last single-channel moves. ``max_gate_epochs`` above
   ``gate_epochs`` lets it go on until the ratio lands within ``tol`` by itself.
2. **fine-tuning**: gates frozen, the remaining weights trained with the task loss alone (a fresh
   AdamW and cosine schedule), in skip mode ``"hard"`` (only open channels are computed).
3. **export**: a plain model with the closed channels removed.

The default split of 18 epochs (4 searching, 14 fine-tuning the settled structure) is measured on
the digits benchmark (``bench/digits_budget.py``; README, "Reaching the target on digits"). The
former default (at least 8 epochs of search, then up to 30 until the ratio landed within ``tol``
by itself, 10 of fine-tuning) lost to Torch-Pruning's L2 pruning fine-tuned for the same total
number of epochs at 0.25 of the FLOPs on both nets and at 0.125 on the wider one (by up to 0.2
points): the final structure got 10 fine-tuning epochs where Torch-Pruning's got all of them (and
on the narrow net, where one channel moves the ratio by 6-21% of the target, the search wandered
for up to 30 epochs).

Skip modes are switched with ``GateBank.set_skip`` where this version of tg_kernels has it.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tg_kernels.pruning.attach import attach_gates
from tg_kernels.pruning.bank import BANK_NAME, gate_bank, unwrap
from tg_kernels.pruning.budget import Budget, BudgetStatus
from tg_kernels.pruning.export import export

SKIP_MODES = ("none", "exact", "hard")
Batches = Iterable[Any] | Callable[[], Iterable[Any]]


@dataclass
class PruneResult:
    """What :func:`prune` returns."""

    model: nn.Module  # the exported, physically smaller plain model
    gated: nn.Module  # the gated model it was exported from (gates frozen)
    budget: Budget
    status: BudgetStatus  # where the budget ended
    history: list[dict[str, float | str | int]] = field(default_factory=list)  # "start", then one row per epoch
    gate_steps: int = 0
    settled_flips: int = 0  # gates that Budget.settle flipped at the end of the search
    seconds: float = 0.0

    def summary(self) -> str:
        st = self.status
        kept = ", ".join(f"{k} {a}/{b}" for k, (a, b) in st.kept.items())
        return (
            f"{st.metric} ratio {st.ratio:.4f} for target {st.target:.4f} ({st.error:+.2%}); "
            f"{self.gate_steps} gate steps, {self.settled_flips} gates flipped by settle; "
            f"kept channels: {kept}; {self.seconds:.1f} s"
        )


def _epoch_batches(data: Batches) -> Iterable[Any]:
    return data() if callable(data) else data


def _split(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        "prune() expects batches of (inputs, targets); pass loss_fn=lambda output, batch_targets: ... for other "
        f"losses, got a {type(batch).__name__}"
    )


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _cosine(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * min(step, total) / max(total, 1)))


def _set_skip(model: nn.Module, mode: str) -> bool:
    """Switch every gated layer and hook to ``mode`` where GateBank.set_skip exists (issue #10)."""
    set_skip = getattr(gate_bank(model), "set_skip", None)
    if set_skip is None:
        return False
    set_skip(mode)
    return True


class _Progress:
    """A rich progress bar when rich is installed and wanted, else nothing."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.bar = None
        if not enabled:
            return
        try:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        except ImportError:  # pragma: no cover - rich is optional
            return
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            transient=False,
        )
        self.bar.start()
        self.task = self.bar.add_task("prune", total=total, info="")

    def update(self, description: str, info: str, advance: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(self.task, advance=advance, description=description, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def prune(
    model: nn.Module,
    data: Batches,
    target: float = 0.5,
    *,
    example_inputs: Any = None,
    metric: str = "flops",
    loss_fn: Callable[[Any, Any], Tensor] = F.cross_entropy,
    gate_epochs: int = 4,
    max_gate_epochs: int | None = None,
    finetune_epochs: int = 14,
    lr: float = 5e-4,
    gate_lr: float = 0.02,
    weight_decay: float = 1e-4,
    tol: float = 0.01,
    min_open: int | float = 1,
    evaluate: Callable[[nn.Module], float] | None = None,
    skip: tuple[str, str] = ("exact", "hard"),
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    compact: bool = True,
    closed_gate_gradients: bool = True,
) -> PruneResult:
    """Prune ``model`` to ``target`` of its FLOPs (or parameters) with trainable gates, in one call.

    Args:
        model: a trained model, ungated (gates are attached here, in place) or already gated by
            :func:`~tg_kernels.attach_gates`.
        data: training batches of ``(inputs, targets)``: a re-iterable such as a DataLoader, or a
            callable returning a fresh iterable for each epoch.
        target: the wanted fraction of the dense model's ``metric``.
        example_inputs: inputs for :func:`~tg_kernels.attach_gates` (FLOPs are counted for them);
            default: the first sample of the first batch.
        metric: ``"flops"``, ``"params"`` or ``"channels"``.
        loss_fn: task loss ``loss_fn(model_output, targets)``.
        gate_epochs: epochs of gate search (the gate learning rate anneals over them).
        max_gate_epochs: ``None`` (the default): the same as ``gate_epochs``. Larger: after
            ``gate_epochs`` the search goes on until the ratio is within ``tol`` by itself, and
            gives up after these; either way :meth:`Budget.settle` lands what is left. Every epoch
            spent here is one the final structure is not fine-tuned for.
        finetune_epochs: epochs with frozen gates at the end.
        lr: the model weights' learning rate (Adam in the search, AdamW in fine-tuning, cosine).
        gate_lr: Adam's learning rate for the gate weights. With gates starting at ``w = 0.5`` a gate
            needs about ``0.5 / gate_lr`` steps to close; the budget's multiplier is tuned to that.
        weight_decay: AdamW's weight decay in fine-tuning.
        tol: the search stops once ``|ratio / target - 1| <= tol``.
        min_open: the per-group minimum of open channels (see :class:`~tg_kernels.Budget`).
        evaluate: optional ``evaluate(model) -> float`` (an accuracy, say), run after each epoch and
            recorded in the history.
        skip: the skip modes of the search and of the fine-tuning (``GateBank.set_skip``; where
            that is missing, gates attached here use the first and keep it). ``("none", "none")``
            computes every step densely: the reference for timing the default.
        compact: attach with compact execution (the ``"hard"`` fine-tuning then runs at the exported
            model's speed; see :mod:`tg_kernels.pruning.compact`); ``False`` keeps the per-layer path.
        closed_gate_gradients: where gates attached here go (see :func:`~tg_kernels.attach_gates`):
            ``True`` keeps them off the input of a ReLU-like activation, so closed gates keep a task
            gradient; ``False`` places them before it, which makes an ``"exact"`` search about as
            fast as ``"hard"`` but reopens closed gates through the budget only.
        progress: show a progress bar (rich, when installed).
        log: optional callable receiving one line of text per epoch.

    Returns:
        A :class:`PruneResult`: the exported model, the gated model, the budget, where it ended,
        one history row per epoch (phase, epoch, ratio, multiplier, loss, and ``evaluate``'s value).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune expects an nn.Module, got {type(model).__name__}")
    if max_gate_epochs is None:
        max_gate_epochs = gate_epochs
    for name, value in (("gate_epochs", gate_epochs), ("max_gate_epochs", max_gate_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise ValueError(f"finetune_epochs must be an int >= 0, got {finetune_epochs!r}")
    if not (isinstance(skip, (tuple, list)) and len(skip) == 2 and all(m in SKIP_MODES for m in skip)):
        raise ValueError(f"skip must be two modes (search, fine-tuning) out of {SKIP_MODES}, got {skip!r}")
    if max_gate_epochs < gate_epochs:
        raise ValueError(f"max_gate_epochs ({max_gate_epochs}) must be >= gate_epochs ({gate_epochs})")
    start = time.perf_counter()
    say = log or (lambda line: None)
    if not hasattr(unwrap(model), BANK_NAME):
        if example_inputs is None:
            first_inputs, _ = _split(next(iter(_epoch_batches(data))))
            example_inputs = tuple(t[:1] for t in first_inputs) if isinstance(first_inputs, tuple) else first_inputs[:1]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # what stays ungated is listed in bank.skipped
            model, _ = attach_gates(
                model, example_inputs, skip=skip[0], compact=compact, closed_gate_gradients=closed_gate_gradients
            )
    bank = gate_bank(model)
    budget = Budget(bank, target=target, metric=metric, min_open=min_open)
    _set_skip(model, skip[0])

    gate_params = list(bank.parameters())
    gate_ids = {id(p) for p in gate_params}
    weights = [p for p in unwrap(model).parameters() if id(p) not in gate_ids and p.requires_grad]
    for p in gate_params:
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": weights, "lr": lr}, {"params": gate_params, "lr": gate_lr}])
    history: list[dict[str, float | str | int]] = []
    steps_per_epoch = None
    step = 0
    done = False
    bar = _Progress(progress, max_gate_epochs + finetune_epochs)

    def record(phase: str, epoch: int, loss: float) -> None:
        st = budget.status()
        row: dict[str, float | str | int] = {
            "phase": phase,
            "epoch": epoch,
            "ratio": st.ratio,
            "weight": st.weight,
            "loss": loss,
            "seconds": time.perf_counter() - start,
        }
        if evaluate is not None:
            was_training = model.training
            row["metric"] = float(evaluate(model))
            model.train(was_training)
        history.append(row)
        extra = f"  eval {row['metric']:.4f}" if "metric" in row else ""
        info = f"{metric} {st.ratio:.4f} -> {st.target:.4f}  lambda {st.weight:.3g}  loss {loss:.4f}{extra}"
        say(f"{phase:<6} epoch {epoch:3d}  {info}")
        bar.update(phase, info)

    try:
        record("start", 0, math.nan)
        model.train()
        for epoch in range(1, max_gate_epochs + 1):
            total, seen = 0.0, 0
            for batch in _epoch_batches(data):
                inputs, targets = _split(batch)
                if steps_per_epoch is not None:
                    anneal = _cosine(step, gate_epochs * steps_per_epoch)
                    opt.param_groups[1]["lr"] = gate_lr * max(anneal, 0.05)
                output = _call(model, inputs)
                task = loss_fn(output, targets)
                loss = task + budget()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                total += float(task.detach())
                seen += 1
                if epoch >= gate_epochs and abs(float(budget.ratio().detach()) / target - 1) <= tol:
                    done = True
                    break
            steps_per_epoch = steps_per_epoch or seen
            _check_signal(output)
            record("gates", epoch, total / max(seen, 1))
            if done:
                break
        searched = float(budget.ratio().detach())
        flips = budget.settle(tol) if not budget.status().within(tol) else 0
        if flips:
            now = float(budget.ratio().detach())
            say(f"settle: flipped {flips} gate(s) nearest their threshold; {metric} ratio {searched:.4f} -> {now:.4f}")
        for p in gate_params:
            p.requires_grad_(False)
        _set_skip(model, skip[1])
        if finetune_epochs:
            tune = torch.optim.AdamW(weights, lr=lr, weight_decay=weight_decay)
            n_steps = finetune_epochs * (steps_per_epoch or 1)
            sched = torch.optim.lr_scheduler.LambdaLR(tune, lambda s: _cosine(s, n_steps))
            for epoch in range(1, finetune_epochs + 1):
                total, seen = 0.0, 0
                for batch in _epoch_batches(data):
                    inputs, targets = _split(batch)
                    task = loss_fn(_call(model, inputs), targets)
                    tune.zero_grad(set_to_none=True)
                    task.backward()
                    tune.step()
                    sched.step()
                    total += float(task.detach())
                    seen += 1
                record("tune", epoch, total / max(seen, 1))
    finally:
        bar.close()
    model.eval()
    small = export(model)
    return PruneResult(
        model=small,
        gated=model,
        budget=budget,
        status=budget.status(),
        history=history,
        gate_steps=step,
        settled_flips=flips,
        seconds=time.perf_counter() - start,
    )


def _check_signal(output: Any) -> None:
    """Warn when a batch's outputs no longer depend on its inputs (every sample gives the same output)."""
    if not isinstance(output, Tensor) or output.dim() < 2 or output.shape[0] < 2:
        return
    spread = output.detach().float().std(0).max()
    if bool(spread <= 1e-6 * output.detach().float().abs().max().clamp_min(1e-12)):
        warnings.warn(
            "tg_kernels.prune: the model's outputs are the same for every sample of the batch: the network has "
            "stopped passing signal (check Budget.report() for closed groups)",
            RuntimeWarning,
            stacklevel=3,
        )


__all__ = ["PruneResult", "prune"]
