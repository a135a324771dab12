"""Pruning inside the Hugging Face ``transformers.Trainer``: :class:`PruningTrainer`.

Importing this module imports ``transformers`` (``tg_kernels`` itself never does: transformers stays
an optional dependency). The trainer runs :func:`~tg_kernels.prune`'s schedule inside the Trainer's
own loop, so its data handling, gradient accumulation, mixed precision, logging, checkpoints and
distributed training (DDP through accelerate) all apply:

1. ``__init__`` attaches the gates to the model before the Trainer wraps it (every rank attaches the
   same gates; DDP then treats them as ordinary parameters). The example inputs are the first
   training sample, collated.
2. The optimizer gets one more parameter group: the gates, at ``gate_lr`` without weight decay,
   scheduled as ``tg.prune`` schedules them (full while the goal moves, then a cosine decay).
3. At the first step the gates start at heights ranked by Taylor importance (the scores summed over
   the ranks), and a :class:`~tg_kernels.Budget` is made. For the first ``search`` fraction of the
   optimizer steps the loss is the model's loss plus the budget term, the goal annealed from 1 to
   the target, in skip mode ``"exact"``.
4. Then :meth:`Budget.settle` lands the ratio, the gates are frozen and the rest of the run
   fine-tunes the remaining weights in skip mode ``"hard"`` (compact execution: the exported
   model's speed).
5. At the end :attr:`PruningTrainer.pruned_model` holds the exported plain model;
   :meth:`PruningTrainer.save_pruned` writes it (``save_pretrained`` where its widths fit the
   config, else ``tg.save``).

Under DDP the gates stay identical on every rank: they start identical, their gradients are
averaged like any parameter's, and the budget, its multiplier and ``settle`` are deterministic
functions of the gates.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import nn

from tg_kernels.pruning.attach import attach_gates
from tg_kernels.pruning.bank import BANK_NAME, gate_bank, unwrap
from tg_kernels.pruning.budget import METRICS, Budget
from tg_kernels.pruning.export import export
from tg_kernels.pruning.export import save as tg_save
from tg_kernels.pruning.train import (
    DEFAULT_ANNEAL,
    DEFAULT_BALANCE,
    DEFAULT_GAIN,
    DEFAULT_PROTECT,
    DEFAULT_SIDE_PASS_EVERY,
    GATE_INITS,
    SKIP_MODES,
    Schedule,
    annealed_goal,
    example_of,
    gate_lr_scale,
    init_gates_from_importance,
    multiplier_rate,
)
from tg_kernels.pruning.uniform import divisible_stream, fit_config


@dataclass
class PruningArguments:
    """What :class:`PruningTrainer` prunes to, and how (the defaults of :func:`~tg_kernels.prune`)."""

    target: float = 0.5  # the wanted fraction of the dense model's ``metric``
    metric: str = "params"  # "flops", "params" or "channels"
    search: float = 0.5  # the fraction of the optimizer steps that searches (the rest fine-tunes)
    anneal: float = DEFAULT_ANNEAL  # the fraction of the search over which the goal moves to the target
    gate_lr: float = 0.02
    tol: float = 0.01  # settle lands the ratio within this relative distance of the target
    min_open: int | float = 1
    protect: float = DEFAULT_PROTECT
    gain: float = DEFAULT_GAIN
    balance: float = DEFAULT_BALANCE
    gate_init: str = "taylor"  # or "constant"
    importance_batches: int = 16  # batches of the Taylor importance pass (per rank)
    uniform: bool = False  # the same widths in every layer (GateBank.make_uniform): a config-shaped model
    compact: bool = True
    side_pass_every: int = DEFAULT_SIDE_PASS_EVERY  # the search's side pass on every k-th step (tg.prune's)
    skip: tuple[str, str] = ("exact", "hard")  # skip modes of the search and the fine-tuning; ("none", "none"): dense

    def check(self) -> None:
        """Clear errors for bad values, before anything runs."""
        if isinstance(self.target, bool) or not isinstance(self.target, (int, float)) or not 0 < self.target <= 1:
            raise ValueError(f"PruningArguments.target must be a fraction in (0, 1], got {self.target!r}")
        if self.metric not in METRICS:
            raise ValueError(f"PruningArguments.metric must be one of {METRICS}, got {self.metric!r}")
        for name in ("search", "anneal"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise ValueError(f"PruningArguments.{name} must be a fraction in [0, 1], got {value!r}")
        skip = self.skip
        if not (isinstance(skip, (tuple, list)) and len(skip) == 2 and all(m in SKIP_MODES for m in skip)):
            raise ValueError(f"PruningArguments.skip must be two modes out of {SKIP_MODES}, got {self.skip!r}")
        every = self.side_pass_every
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"PruningArguments.side_pass_every must be an int >= 1, got {self.side_pass_every!r}")
        if self.gate_init not in GATE_INITS:
            raise ValueError(f"PruningArguments.gate_init must be one of {GATE_INITS}, got {self.gate_init!r}")


class _Phases(transformers.TrainerCallback):
    """Starts the search at the first step, ends it after ``search`` of the steps, exports at the end."""

    def __init__(self, trainer: PruningTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        self.trainer._begin_search(state.max_steps)

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.phase == "search" and state.global_step >= self.trainer.schedule.search_steps:
            self.trainer._end_search()

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer.phase == "search":  # a run shorter than its search: land and freeze anyway
            self.trainer._end_search()
        self.trainer._export()


class PruningTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` that prunes its model to a budget while it trains, then exports it.

    Args:
        model: a ``PreTrainedModel`` (or any module the Trainer takes), ungated or already gated by
            :func:`~tg_kernels.attach_gates`.
        args: ``TrainingArguments``; ``max_steps`` or the epochs set the length of the whole run
            (search plus fine-tuning).
        pruning: :class:`PruningArguments` (default: half the parameters).
        example_inputs: keyword inputs for :func:`~tg_kernels.attach_gates`; default: the first
            training sample through the data collator (``labels`` left out).
        **kwargs: the rest of ``transformers.Trainer``'s arguments (``train_dataset``,
            ``data_collator``, ``eval_dataset``, ...). ``optimizers`` must be left out: the gates
            need their own parameter group.

    After ``train()``: :attr:`pruned_model` (the exported plain model), :attr:`budget`,
    :attr:`gated_model` and :meth:`save_pruned`. ``trainer.log`` rows carry ``tg_ratio`` (the budget
    metric's ratio now) and ``tg_lambda`` (the multiplier); during the search the logged ``loss``
    includes the budget term, logged too as ``tg_budget_term`` (it can be negative: the bottleneck
    protection pushes thin groups open).
    """

    def __init__(
        self,
        model: nn.Module | None = None,
        args: transformers.TrainingArguments | None = None,
        *,
        pruning: PruningArguments | None = None,
        example_inputs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.pruning = pruning if pruning is not None else PruningArguments()
        if not isinstance(self.pruning, PruningArguments):
            raise TypeError(f"pruning must be a PruningArguments, got {type(self.pruning).__name__}")
        self.pruning.check()
        if kwargs.get("optimizers", (None, None)) != (None, None):
            raise ValueError(
                "PruningTrainer makes its own optimizer (the gates need their own group): leave out optimizers"
            )
        if args is not None and args.ddp_find_unused_parameters is None:
            args.ddp_find_unused_parameters = True  # frozen gates get no gradient while fine-tuning
        super().__init__(model=model, args=args, **kwargs)
        self._set_signature_columns_if_needed()  # the model's own signature, before the compact forward
        if not hasattr(unwrap(self.model), BANK_NAME):
            example = example_inputs if example_inputs is not None else self._example()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # what stays ungated is listed in bank.skipped
                attach_gates(self.model, example_kwargs=example, compact=self.pruning.compact)
        self.bank = gate_bank(self.model)
        if self.pruning.uniform:
            self.bank.make_uniform()
        self.bank.set_skip(self.pruning.skip[0])
        if self.bank.compact is not None:
            self.bank.compact.side_pass_every = self.pruning.side_pass_every
        self.budget: Budget | None = None
        self.schedule: Schedule | None = None
        self.phase = "dense"  # "search", then "tune"
        self.settled_flips = 0
        self.last_budget_term = 0.0  # the budget term of the last search step (in the logged loss)
        self.pruned_model: nn.Module | None = None
        self.add_callback(_Phases(self))

    @property
    def gated_model(self) -> nn.Module:
        """The gated model (gates frozen after the search)."""
        return unwrap(self.model)

    def _example(self) -> dict[str, Any]:
        if self.train_dataset is None or not hasattr(self.train_dataset, "__getitem__"):
            raise ValueError(
                "PruningTrainer needs example_inputs={...} (the model's keyword inputs) when train_dataset is "
                "not indexable"
            )
        batch = self.data_collator([self.train_dataset[0]])
        if not isinstance(batch, dict):
            raise ValueError(f"the data collator gave a {type(batch).__name__}; pass example_inputs={{...}}")
        return example_of(dict(batch), self.args.device)

    # ----------------------------------------------------------------------------------------------
    # optimizer: the gates in their own group
    # ----------------------------------------------------------------------------------------------

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        optimizer = super().create_optimizer(model)
        if any(group.get("tg_gates") for group in optimizer.param_groups):
            return optimizer
        gates = list(self.bank.parameters())
        ids = {id(p) for p in gates}
        for group in optimizer.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        optimizer.add_param_group({"params": gates, "lr": self.pruning.gate_lr, "weight_decay": 0.0, "tg_gates": True})
        return optimizer

    def create_scheduler(self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None):
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        lambdas = getattr(scheduler, "lr_lambdas", None)
        groups = scheduler.optimizer.param_groups
        index = next((i for i, g in enumerate(groups) if g.get("tg_gates")), None)
        if lambdas is not None and index is not None and len(lambdas) == len(groups):
            lambdas[index] = self._gate_lr_factor
            groups[index]["lr"] = self.pruning.gate_lr
        return scheduler

    def _gate_lr_factor(self, step: int) -> float:
        if self.schedule is None:
            return 1.0
        return gate_lr_scale(step, self.schedule) if step < self.schedule.search_steps else 0.0

    # ----------------------------------------------------------------------------------------------
    # phases
    # ----------------------------------------------------------------------------------------------

    def _begin_search(self, max_steps: int) -> None:
        p = self.pruning
        search = max(1, round(p.search * max_steps))
        self.schedule = Schedule(
            steps_per_epoch=max_steps,
            search_steps=search,
            anneal_steps=round(p.anneal * search),
            tune_steps=max_steps - search,
            max_search_steps=search,
        )
        model = unwrap(self.model)
        for param in self.bank.parameters():
            param.requires_grad_(True)
        if p.gate_init == "taylor":
            model.train()
            loader = self.get_train_dataloader()
            batches = (batch for _, batch in zip(range(p.importance_batches), loader))
            init_gates_from_importance(model, batches)
        self.budget = Budget(
            self.bank,
            target=p.target,
            metric=p.metric,
            min_open=p.min_open,
            protect=p.protect,
            rate=multiplier_rate(self.schedule),
            gain=p.gain,
            balance=p.balance,
        )
        self.phase = "search"

    def _end_search(self) -> None:
        if not self.budget.status().within(self.pruning.tol):
            self.settled_flips = self.budget.settle(self.pruning.tol)
        if self.pruning.uniform:
            self.settled_flips += divisible_stream(unwrap(self.model), self.budget, self.pruning.tol)
        for param in self.bank.parameters():
            param.requires_grad_(False)
            param.grad = None
        self.bank.set_skip(self.pruning.skip[1])
        self.phase = "tune"

    def _export(self) -> None:
        model = unwrap(self.model)
        was = model.training
        model.eval()
        self.pruned_model = export(model)
        model.train(was)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        if self.phase != "search" or not model.training or not torch.is_grad_enabled():
            return out
        self.budget.set_goal(annealed_goal(self.pruning.target, self.state.global_step, self.schedule.anneal_steps))
        term = self.budget()
        self.last_budget_term = float(term.detach())
        if return_outputs:
            loss, outputs = out
            return loss + term.to(loss.dtype), outputs
        return out + term.to(out.dtype)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.budget is not None:
            status = self.budget.status()
            logs = {**logs, "tg_ratio": round(status.ratio, 4), "tg_lambda": round(status.weight, 4)}
            if self.phase == "search":
                logs["tg_budget_term"] = round(self.last_budget_term, 4)
        super().log(logs, *args, **kwargs)

    # ----------------------------------------------------------------------------------------------
    # the result
    # ----------------------------------------------------------------------------------------------

    def save_pruned(self, output_dir: str | os.PathLike) -> str:
        """Write the pruned model to ``output_dir``: ``save_pretrained`` with its config updated where
        every layer keeps the same widths (:func:`pretrained_config`), else ``tg.save`` to
        ``output_dir/pruned.pt`` (load it with ``tg.load`` into a fresh model). Returns what was written."""
        if self.pruned_model is None:
            raise ValueError("save_pruned() needs a trained PruningTrainer: call train() first")
        os.makedirs(output_dir, exist_ok=True)
        if self.args.process_index != 0:
            return os.fspath(output_dir)
        try:
            fit_config(self.pruned_model)
        except ValueError:
            path = os.path.join(output_dir, "pruned.pt")
            tg_save(self.pruned_model, path)
            return path
        self.pruned_model.save_pretrained(output_dir)
        return os.fspath(output_dir)


__all__ = ["PruningArguments", "PruningTrainer", "divisible_stream", "fit_config"]
