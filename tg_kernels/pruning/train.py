"""`prune`: the recommended schedule in one call: gate, search towards a budget, fine-tune, export.

The long-hand loop (``attach_gates``, ``Budget``, your optimiser, ``export``) stays available and
documented in the README. :func:`prune` is built from the pieces below, in this order:

1. :func:`_validate` checks the arguments; :func:`_attach` gates the model unless it is gated;
   :func:`plan_schedule` turns ``gate_epochs + finetune_epochs`` epochs into optimizer steps: the
   search gets ``gate_epochs`` epochs or ``min_search_steps`` steps, whichever is more (the minimum
   taking at most 60% of the run), the fine-tuning the rest.
2. :func:`init_gates_from_importance` (``gate_init="taylor"``) starts each gate at a height ranked by
   its channel's first-order Taylor importance within its group, so that channels close one at a
   time, least important first, in every group alike.
3. :func:`_search`: task loss plus the adaptive :class:`~tg_kernels.Budget` (with its bottleneck
   protection, ``protect``, its proportional term ``gain`` and its cost ``balance``); Adam moves the
   weights and the gates together in skip mode ``"exact"``. The budget's goal moves from 1 down to
   the target over the first ``anneal`` of the search (the paper's gradual target); the rest holds
   the target while the gate learning rate decays. :meth:`Budget.settle` then makes the last
   single-channel moves (spread over the groups: none closed below half the model-wide open
   fraction while another move is left).
4. :func:`_finetune`: gates frozen, the remaining weights trained with the task loss alone (a fresh
   AdamW and cosine schedule) in skip mode ``"hard"``; then :func:`~tg_kernels.export`.

Why: with every gate at the same height, little time (4 epochs of a small dataset are ~50 steps,
about as many as a gate needs to close) and the budget's push proportional to each channel's cost,
the former schedule closed the costliest layer in one sweep before the weights could adapt (the
narrow digits CNN kept 1 of 16 first-conv channels at a 0.25 FLOPs target and lost 15 points). The
defaults were chosen on validation splits (``bench/accuracy.py --split val``).

On a Fashion-MNIST ResNet-20 that schedule still failed (73.6% at 0.5 FLOPs against 82.5% dense): the
search lagged its goal (the gates' Adam steps are normalised by noisy task gradients, and the
multiplier only integrated the lag) and ended at 0.69 of the FLOPs for a 0.5 target; ``settle``
then closed, eleven times in a row, a channel of the costliest group (the first stage's residual
group, 11 -> 1 of 16), because its rule took the flip landing closest to the target. ``gain`` makes
the search land by itself; ``settle``'s ``spread`` keeps what is left from thinning one group.

Skip modes are switched with ``GateBank.set_skip`` where this version of tg_kernels has it.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from tg_kernels.pruning.attach import attach_gates
from tg_kernels.pruning.bank import BANK_NAME, gate_bank, unwrap
from tg_kernels.pruning.budget import Budget, BudgetStatus
from tg_kernels.pruning.export import export
from tg_kernels.pruning.uniform import divisible_stream, fit_config, is_llama_like

SKIP_MODES = ("none", "exact", "hard")
GATE_INITS = ("taylor", "constant")
DEFAULT_MIN_SEARCH_STEPS = 300
DEFAULT_ANNEAL = 0.7
DEFAULT_GATE_INIT = "taylor"
DEFAULT_PROTECT = 0.5
DEFAULT_GAIN = 8.0
DEFAULT_BALANCE = 0.5
# the search's side pass on every 8th step (scaled by 8): chosen on the validation split of
# bench/accuracy.py against the side pass on every step (docs/compact.md, "side_pass_every")
DEFAULT_SIDE_PASS_EVERY = 8
MAX_SEARCH_SHARE = 0.6
Batches = Iterable[Any] | Callable[[], Iterable[Any]]


@dataclass
class PruneResult:
    """What :func:`prune` returns."""

    model: nn.Module  # the exported, physically smaller plain model
    gated: nn.Module  # the gated model it was exported from (gates frozen)
    budget: Budget
    status: BudgetStatus  # where the budget ended
    history: list[dict[str, float | str | int]] = field(default_factory=list)  # "start", then one row per epoch
    gate_steps: int = 0  # optimizer steps of the search
    tune_steps: int = 0  # optimizer steps of the fine-tuning
    settled_flips: int = 0  # gates that Budget.settle flipped at the end of the search
    seconds: float = 0.0
    schedule: Schedule | None = None

    @property
    def steps(self) -> int:
        """Optimizer steps after the dense model: search plus fine-tuning."""
        return self.gate_steps + self.tune_steps

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
    """(inputs, targets) of a batch: a pair, or a dict of model keyword arguments (targets: its "labels")."""
    if isinstance(batch, dict):
        return batch, batch.get("labels")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        "prune() expects batches of (inputs, targets) or dicts of the model's keyword arguments (Hugging Face "
        f'style: {{"input_ids": ..., "labels": ...}}), got a {type(batch).__name__}'
    )


def _call(model: nn.Module, inputs: Any) -> Any:
    if isinstance(inputs, dict):
        return model(**inputs)
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _model_loss(output: Any) -> Tensor | None:
    """The loss a model computed itself: a Hugging Face output's ``.loss`` or a dict's ``"loss"``."""
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    return loss if isinstance(loss, Tensor) else None


def _to_device(data: Any, device: torch.device) -> Any:
    """``data`` with every tensor in it (in tuples, lists and dicts) on ``device``."""
    if isinstance(data, Tensor):
        return data if data.device == device else data.to(device, non_blocking=True)
    if isinstance(data, dict):
        return type(data)({k: _to_device(v, device) for k, v in data.items()})
    if isinstance(data, (tuple, list)):
        return type(data)(_to_device(v, device) for v in data)
    return data


@dataclass(frozen=True)
class _Step:
    """How one batch becomes a task loss: the model's device, the autocast dtype and the loss function."""

    device: torch.device
    autocast: torch.dtype | None
    loss_fn: Callable[[Any, Any], Tensor] | None

    def __call__(self, model: nn.Module, batch: Any) -> tuple[Any, Tensor]:
        """(the model's output, the task loss) for ``batch``, moved to the device, under autocast if asked."""
        inputs, targets = _split(_to_device(batch, self.device))
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            output = _call(model, inputs)
            if self.loss_fn is not None:
                return output, self.loss_fn(output, targets)
            own = _model_loss(output)
            if own is not None:
                return output, own
            if targets is None:
                raise ValueError(
                    "prune() found no loss: the model's output has no .loss and the batch no targets; pass "
                    "labels in the batch or loss_fn=lambda output, targets: ..."
                )
            return output, F.cross_entropy(output, targets)


def _model_device(model: nn.Module) -> torch.device:
    param = next(unwrap(model).parameters(), None)
    return param.device if param is not None else torch.device("cpu")


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


@dataclass(frozen=True)
class Schedule:
    """The search and fine-tuning lengths of one :func:`prune` call, in optimizer steps."""

    steps_per_epoch: int
    search_steps: int  # gate search (weights and gates together)
    anneal_steps: int  # the goal moves from 1 to the target over these first search steps
    tune_steps: int  # fine-tuning with frozen gates
    max_search_steps: int  # the search may go on to these until the ratio is within tol by itself

    @property
    def total_steps(self) -> int:
        return self.search_steps + self.tune_steps


def _check_int(name: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def _validate(
    model: Any,
    gate_epochs: int,
    max_gate_epochs: int,
    finetune_epochs: int,
    skip: Any,
    min_search_steps: int,
    anneal: float,
    gate_init: str,
    protect: float,
) -> None:
    """Argument checks of :func:`prune`, before anything runs."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"prune expects an nn.Module, got {type(model).__name__}")
    for name, value in (("gate_epochs", gate_epochs), ("max_gate_epochs", max_gate_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise ValueError(f"finetune_epochs must be an int >= 0, got {finetune_epochs!r}")
    if not (isinstance(skip, (tuple, list)) and len(skip) == 2 and all(m in SKIP_MODES for m in skip)):
        raise ValueError(f"skip must be two modes (search, fine-tuning) out of {SKIP_MODES}, got {skip!r}")
    if max_gate_epochs < gate_epochs:
        raise ValueError(f"max_gate_epochs ({max_gate_epochs}) must be >= gate_epochs ({gate_epochs})")
    _check_int("min_search_steps", min_search_steps, 0)
    if isinstance(anneal, bool) or not isinstance(anneal, (int, float)) or not 0 <= anneal <= 1:
        raise ValueError(f"anneal must be a fraction of the search in [0, 1], got {anneal!r}")
    if gate_init not in GATE_INITS:
        raise ValueError(f"gate_init must be one of {GATE_INITS}, got {gate_init!r}")
    if isinstance(protect, bool) or not isinstance(protect, (int, float)) or not 0 <= protect < 1:
        raise ValueError(f"protect must be a number in [0, 1), got {protect!r}")


def _count_steps(data: Batches) -> int:
    """Batches per epoch: ``len`` of the iterable where it has one, else one pass counting them."""
    batches = _epoch_batches(data)
    try:
        n = len(batches)  # type: ignore[arg-type]
    except TypeError:
        n = sum(1 for _ in batches)
    if n < 1:
        raise ValueError("prune() got no batches: data yields nothing")
    return n


def plan_schedule(
    steps_per_epoch: int,
    gate_epochs: int,
    max_gate_epochs: int,
    finetune_epochs: int,
    min_search_steps: int,
    anneal: float,
    search_share: float = MAX_SEARCH_SHARE,
) -> Schedule:
    """Steps of the search and of the fine-tuning for ``gate_epochs + finetune_epochs`` epochs of data.

    The run has ``gate_epochs + finetune_epochs`` epochs. The search gets ``gate_epochs`` of them or
    ``min_search_steps`` optimizer steps, whichever is more (the steps the weights need to adapt
    while channels close do not shrink with the dataset), but the minimum takes no more than
    ``search_share`` of the run; the fine-tuning gets the rest. So the total never changes, and on
    a large dataset (``gate_epochs`` epochs already above ``min_search_steps``) nothing changes.
    """
    total = (gate_epochs + finetune_epochs) * steps_per_epoch
    search = max(gate_epochs * steps_per_epoch, min(min_search_steps, int(search_share * total)))
    extra = (max_gate_epochs - gate_epochs) * steps_per_epoch
    return Schedule(
        steps_per_epoch=steps_per_epoch,
        search_steps=search,
        anneal_steps=int(round(anneal * search)),
        tune_steps=max(total - search, 0),
        max_search_steps=search + extra,
    )


def _stream(data: Batches) -> Iterator[tuple[int, Any]]:
    """(epoch, batch) pairs, epoch after epoch, for as long as they are asked for."""
    epoch = 0
    while True:
        epoch += 1
        empty = True
        for batch in _epoch_batches(data):
            empty = False
            yield epoch, batch
        if empty:
            raise ValueError("prune() got no batches: data yields nothing")


def _attach(model: nn.Module, data: Batches, example_inputs: Any, skip: str, compact: bool, closed: bool):
    if hasattr(unwrap(model), BANK_NAME):
        return model
    if example_inputs is None:
        first = next(iter(_epoch_batches(data)), None)
        if first is None:
            raise ValueError("prune() got no batches: data yields nothing")
        example_inputs = example_of(first, _model_device(model))
    args, kwargs = ((), example_inputs) if isinstance(example_inputs, dict) else (example_inputs, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what stays ungated is listed in bank.skipped
        model, _ = attach_gates(
            model, args, example_kwargs=kwargs, skip=skip, compact=compact, closed_gate_gradients=closed
        )
    return model


def example_of(batch: Any, device: torch.device | None = None) -> Any:
    """Example inputs for :func:`~tg_kernels.attach_gates` from a training batch: its first sample.

    A dict batch gives a dict of keyword arguments (its ``"labels"`` left out: FLOPs are counted for
    the forward the model runs at inference); a pair ``(inputs, targets)`` gives ``inputs[:1]``.
    """
    inputs, _ = _split(batch)
    if isinstance(inputs, dict):
        inputs = {k: v[:1] if isinstance(v, Tensor) else v for k, v in inputs.items() if k != "labels"}
    elif isinstance(inputs, tuple):
        inputs = tuple(t[:1] for t in inputs)
    else:
        inputs = inputs[:1]
    return inputs if device is None else _to_device(inputs, device)


@torch.no_grad()
def init_gates_from_importance(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    low: float = 0.1,
    high: float = 1.0,
    *,
    autocast: torch.dtype | None = None,
) -> dict[str, Tensor]:
    """Start each gate at a height that ranks its channel's importance within its group.

    Importance is the first-order Taylor score of the channel (Molchanov et al. 2019): the mean over
    ``batches`` of ``|dL/dgate|``, the loss change to first order of removing the channel, read off
    the gates' own gradients (so it works for every group the analysis found, residual-coupled ones
    included). Within each group the least important channel starts at ``low`` and the most important
    at ``high`` (linear in rank). Under Adam a gate under steady budget pressure moves about
    ``gate_lr`` per step, so gates that start lower cross their threshold first: channels close one
    at a time in order of importance, in every group alike, instead of a whole group reaching the
    threshold in the same few steps. Returns the scores. Under ``torch.distributed`` (initialised,
    more than one rank) every rank must call it: the scores are summed over the ranks first.
    ``batches`` and ``loss_fn`` are read as :func:`prune` reads them (pairs or dicts;
    ``loss_fn=None``: the model's own ``.loss``).
    """
    step = _Step(_model_device(model), autocast, loss_fn)
    bank = gate_bank(model)
    params = {key: gate.weight for key, gate in bank.gates.items()}
    scores = {key: torch.zeros_like(w) for key, w in params.items()}
    was = [p.requires_grad for p in params.values()]
    for p in params.values():
        p.requires_grad_(True)
    seen = 0
    with torch.enable_grad():
        for batch in batches:
            _, loss = step(model, batch)
            grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
            for key, g in zip(params, grads):
                if g is not None:
                    scores[key] += g.abs()
            seen += 1
    for p, r in zip(params.values(), was):
        p.requires_grad_(r)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for s in scores.values():  # every rank saw other batches: rank on the sum, so that gates stay identical
            dist.all_reduce(s)
    if not seen:
        return scores
    for key, w in params.items():
        n = w.numel()
        if n < 2:
            continue
        rank = torch.empty_like(w)
        rank[torch.argsort(scores[key], stable=True)] = torch.arange(n, dtype=w.dtype, device=w.device)
        w.copy_(low + (high - low) * rank / (n - 1))
    return scores


def annealed_goal(target: float, step: int, anneal_steps: int) -> float:
    """The budget's goal at search step ``step``: from 1 down to ``target`` over ``anneal_steps``,
    geometric in the cosine of the step."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return target
    progress = 1 - _cosine(step, anneal_steps)  # 0 -> 1, slow at both ends
    return math.exp(progress * math.log(target))


def gate_lr_scale(step: int, schedule: Schedule) -> float:
    """The gates' learning rate at search step ``step``, as a fraction of ``gate_lr``: full while the
    goal moves, then a cosine decay (to 5%) so that the ratio settles."""
    hold = schedule.search_steps - schedule.anneal_steps
    anneal = _cosine(step - schedule.anneal_steps, hold) if step >= schedule.anneal_steps else 1.0
    return max(anneal, 0.05)


def multiplier_rate(schedule: Schedule) -> float:
    """The budget multiplier's rate for a search: it must be able to grow ~e^4 (55x) within the part
    of the search that moves the goal."""
    return max(0.02, 4.0 / max(schedule.anneal_steps or schedule.search_steps, 1))


def _search(model, budget, opt, stream, schedule, step_loss, gate_lr, target, tol, record) -> int:
    """Task loss + budget on weights and gates together; returns the steps taken."""
    model.train()
    step, epoch, total, seen = 0, None, 0.0, 0
    output = None
    for epoch_now, batch in stream:
        if epoch is not None and epoch_now != epoch:
            _check_signal(output)
            record("gates", epoch, total / max(seen, 1))
            total, seen = 0.0, 0
        epoch = epoch_now
        budget.set_goal(annealed_goal(target, step, schedule.anneal_steps))
        # the gates move at full speed while the goal moves, then slow down (cosine) so that the ratio settles
        opt.param_groups[1]["lr"] = gate_lr * gate_lr_scale(step, schedule)
        output, task = step_loss(model, batch)
        loss = task + budget()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        total += float(task.detach())
        seen += 1
        if step >= schedule.search_steps and (
            step >= schedule.max_search_steps or abs(float(budget.ratio().detach()) / target - 1) <= tol
        ):
            break
    _check_signal(output)
    record("gates", epoch or 0, total / max(seen, 1))
    budget.set_goal(target)
    return step


def _finetune(model, weights, stream, steps, steps_per_epoch, step_loss, lr, weight_decay, record) -> int:
    """Frozen gates, the task loss alone: AdamW with a cosine schedule for ``steps`` steps."""
    if steps <= 0:
        return 0
    tune = torch.optim.AdamW(weights, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(tune, lambda s: _cosine(s, steps))
    model.train()
    total, seen, done = 0.0, 0, 0
    for _, batch in stream:
        _, task = step_loss(model, batch)
        tune.zero_grad(set_to_none=True)
        task.backward()
        tune.step()
        sched.step()
        total += float(task.detach())
        seen += 1
        done += 1
        if seen == steps_per_epoch or done == steps:
            record("tune", math.ceil(done / steps_per_epoch), total / max(seen, 1))
            total, seen = 0.0, 0
        if done >= steps:
            break
    return done


def prune(
    model: nn.Module,
    data: Batches,
    target: float = 0.5,
    *,
    example_inputs: Any = None,
    metric: str = "flops",
    loss_fn: Callable[[Any, Any], Tensor] | None = None,
    gate_epochs: int = 4,
    max_gate_epochs: int | None = None,
    finetune_epochs: int = 14,
    lr: float = 5e-4,
    gate_lr: float = 0.02,
    weight_decay: float = 1e-4,
    tol: float = 0.01,
    min_open: int | float = 1,
    min_search_steps: int = DEFAULT_MIN_SEARCH_STEPS,
    anneal: float = DEFAULT_ANNEAL,
    gate_init: str = DEFAULT_GATE_INIT,
    protect: float = DEFAULT_PROTECT,
    gain: float = DEFAULT_GAIN,
    balance: float = DEFAULT_BALANCE,
    evaluate: Callable[[nn.Module], float] | None = None,
    skip: tuple[str, str] = ("exact", "hard"),
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    compact: bool = True,
    closed_gate_gradients: bool = True,
    side_pass_every: int = DEFAULT_SIDE_PASS_EVERY,
    autocast: torch.dtype | None = None,
    uniform: bool = False,
) -> PruneResult:
    """Prune ``model`` to ``target`` of its FLOPs (or parameters) with trainable gates, in one call.

    Args:
        model: a trained model, ungated (gates are attached here, in place) or already gated by
            :func:`~tg_kernels.attach_gates`.
        data: training batches of ``(inputs, targets)``, or dicts of the model's keyword arguments
            (Hugging Face style: ``{"input_ids", "attention_mask", "labels"}``; the model is called
            with ``**batch``): a re-iterable such as a DataLoader, or a callable returning a fresh
            iterable for each epoch. Without ``len`` one epoch is iterated once first to count its
            batches. Tensors are moved to the model's device.
        target: the wanted fraction of the dense model's ``metric``.
        example_inputs: inputs for :func:`~tg_kernels.attach_gates` (FLOPs are counted for them);
            default: the first sample of the first batch (:func:`example_of`; a dict batch gives
            keyword arguments, its ``"labels"`` left out).
        metric: ``"flops"``, ``"params"`` or ``"channels"``.
        loss_fn: task loss ``loss_fn(model_output, targets)`` (``targets``: a dict batch's
            ``"labels"``). ``None`` (the default): the loss the model returns (a Hugging Face
            output's ``.loss``, a dict's ``"loss"``), else ``cross_entropy(output, targets)``.
        gate_epochs: epochs of gate search, unless ``min_search_steps`` asks for more steps.
        max_gate_epochs: ``None`` (the default): no more than the planned search. Larger: after the
            planned search it goes on (up to these many epochs' worth of extra steps) until the
            ratio is within ``tol`` by itself; either way :meth:`Budget.settle` lands what is left.
        finetune_epochs: with ``gate_epochs``, the length of the whole run: ``gate_epochs +
            finetune_epochs`` epochs, of which the fine-tuning gets what the search leaves.
        lr: the model weights' learning rate (Adam in the search, AdamW in fine-tuning, cosine).
        gate_lr: Adam's learning rate for the gate weights (cosine-annealed over the search). A gate
            under steady pressure moves about ``gate_lr`` per step, so one that starts at ``w``
            closes after about ``w / gate_lr`` steps.
        weight_decay: AdamW's weight decay in fine-tuning.
        tol: the ratio must end within ``|ratio / target - 1| <= tol`` (settle makes the last moves).
        min_open: the per-group minimum of open channels (see :class:`~tg_kernels.Budget`).
        min_search_steps: the search takes at least this many optimizer steps, taken from the
            fine-tuning but never more than 60% of the run (:func:`plan_schedule`): on a small
            dataset ``gate_epochs`` are too few steps for the weights to adapt while channels close.
        anneal: the fraction of the search over which the budget's goal moves from 1 down to
            ``target`` (the paper's gradual target); the rest of the search holds the target.
            ``0`` pulls towards the target from the first step.
        gate_init: ``"taylor"``: gates start at heights ranked by each channel's Taylor importance
            within its group (:func:`init_gates_from_importance`, one pass over
            ``min(steps_per_epoch, 16)`` batches); ``"constant"``: every gate at 0.5.
        protect: in ``[0, 1)``: how strongly the budget holds open the last channels of a group
            that is thinner than the rest (:class:`~tg_kernels.Budget`'s ``protect``).
        gain: the budget multiplier's proportional term (:class:`~tg_kernels.Budget`'s ``gain``):
            while the ratio lags the annealed goal by ``log(ratio / goal) = d``, the push is
            ``exp(gain * d)`` times stronger at once, so that the search reaches the target by
            itself instead of leaving :meth:`Budget.settle` many flips to make.
        balance: in ``[0, 1]``: ``1`` scales the budget's push on each group by the inverse of its
            per-channel cost (:class:`~tg_kernels.Budget`'s ``balance``), so that gates close in
            order of task importance, not of what their channel costs; ``0`` is the paper's push.
        evaluate: optional ``evaluate(model) -> float`` (an accuracy, say), run after each epoch and
            recorded in the history.
        skip: the skip modes of the search and of the fine-tuning (``GateBank.set_skip``; where
            that is missing, gates attached here use the first and keep it). ``("none", "none")``
            computes every step densely: the reference for timing the default.
        compact: attach with compact execution (the ``"hard"`` fine-tuning then runs at the exported
            model's speed; see :mod:`tg_kernels.pruning.compact`); ``False`` keeps the per-layer path.
        closed_gate_gradients: where gates attached here go (see :func:`~tg_kernels.attach_gates`).
        side_pass_every: ``k``: the ``"exact"`` search runs the closed-channel side pass on every
            ``k``-th step only, its closed-gate gradients scaled by ``k`` (an unbiased estimate at
            ``1 / k`` of its cost; ``GateBank.compact.side_pass_every``). ``1``: every step, which
            gives the closed gates ``none`` mode's exact gradients at a cost about that of the
            compact step itself on CNNs. Default 8 (``DEFAULT_SIDE_PASS_EVERY``).
        progress: show a progress bar (rich, when installed).
        log: optional callable receiving one line of text per epoch.
        autocast: a dtype (``torch.bfloat16``, ``torch.float16``) to run the forward and the task
            loss under ``torch.autocast`` on the model's device; ``None`` (default): no autocast.
        uniform: keep the widths the same in every repeated layer (:meth:`GateBank.make_uniform`:
            groups that differ only in their layer index share one gate, head dims stay whole), so
            that a Hugging Face decoder's result is a model its config describes: the hidden size is
            then made a multiple of the kept heads (:func:`divisible_stream`) and the exported
            model's config set to its widths (:func:`fit_config`, Llama-like decoders), so that
            ``save_pretrained`` / ``from_pretrained`` round-trip it. ``False`` (default): each layer
            keeps its own widths (save those with ``tg.save``).

    Returns:
        A :class:`PruneResult`: the exported model, the gated model, the budget, where it ended,
        one history row per epoch (phase, epoch, ratio, multiplier, loss, and ``evaluate``'s value).
    """
    if max_gate_epochs is None:
        max_gate_epochs = gate_epochs
    _validate(model, gate_epochs, max_gate_epochs, finetune_epochs, skip, min_search_steps, anneal, gate_init, protect)
    if autocast is not None and not (isinstance(autocast, torch.dtype) and autocast.is_floating_point):
        raise ValueError(f"autocast must be None or a floating dtype such as torch.bfloat16, got {autocast!r}")
    start = time.perf_counter()
    say = log or (lambda line: None)
    _check_int("side_pass_every", side_pass_every, 1)
    if not isinstance(uniform, bool):
        raise TypeError(f"uniform must be True or False, got {uniform!r}")
    model = _attach(model, data, example_inputs, skip[0], compact, closed_gate_gradients)
    bank = gate_bank(model)
    if uniform:
        bank.make_uniform()  # before the budget and the optimizer: tied groups become one gate
    if getattr(bank, "compact", None) is not None:
        bank.compact.side_pass_every = side_pass_every
    step_loss = _Step(_model_device(model), autocast, loss_fn)
    _set_skip(model, skip[0])
    schedule = plan_schedule(
        _count_steps(data), gate_epochs, max_gate_epochs, finetune_epochs, min_search_steps, anneal
    )
    rate = multiplier_rate(schedule)
    budget = Budget(
        bank, target=target, metric=metric, min_open=min_open, protect=protect, rate=rate, gain=gain, balance=balance
    )
    stream = _stream(data)
    if gate_init == "taylor":
        model.train()
        n = min(schedule.steps_per_epoch, 16)
        init_gates_from_importance(
            model, (batch for _, (_, batch) in zip(range(n), stream)), loss_fn, autocast=autocast
        )
        stream = _stream(data)  # the search starts at a fresh epoch

    gate_params = list(bank.parameters())
    gate_ids = {id(p) for p in gate_params}
    weights = [p for p in unwrap(model).parameters() if id(p) not in gate_ids and p.requires_grad]
    for p in gate_params:
        p.requires_grad_(True)
    opt = torch.optim.Adam([{"params": weights, "lr": lr}, {"params": gate_params, "lr": gate_lr}])
    history: list[dict[str, float | str | int]] = []
    bar = _Progress(progress, math.ceil(schedule.total_steps / schedule.steps_per_epoch) + 1)

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
        steps = _search(model, budget, opt, stream, schedule, step_loss, gate_lr, target, tol, record)
        searched = float(budget.ratio().detach())
        flips = budget.settle(tol) if not budget.status().within(tol) else 0
        if uniform:
            flips += divisible_stream(unwrap(model), budget, tol)
        if flips:
            now = float(budget.ratio().detach())
            say(f"settle: flipped {flips} gate(s) nearest their threshold; {metric} ratio {searched:.4f} -> {now:.4f}")
        for p in gate_params:
            p.requires_grad_(False)
        _set_skip(model, skip[1])
        tuned = _finetune(
            model,
            weights,
            _stream(data),
            schedule.tune_steps,
            schedule.steps_per_epoch,
            step_loss,
            lr,
            weight_decay,
            record,
        )
    finally:
        bar.close()
    model.eval()
    small = export(model)
    if uniform and is_llama_like(small):
        fit_config(small)
    return PruneResult(
        model=small,
        gated=model,
        budget=budget,
        status=budget.status(),
        history=history,
        gate_steps=steps,
        tune_steps=tuned,
        settled_flips=flips,
        seconds=time.perf_counter() - start,
        schedule=schedule,
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


__all__ = [
    "PruneResult",
    "Schedule",
    "annealed_goal",
    "example_of",
    "gate_lr_scale",
    "init_gates_from_importance",
    "multiplier_rate",
    "plan_schedule",
    "prune",
]
