"""Uniform widths for models a config describes: the exported model of a Llama-like decoder whose
every layer keeps the same widths (:meth:`GateBank.make_uniform <tg_kernels.pruning.bank.GateBank.make_uniform>`)
becomes a model that ``save_pretrained`` / ``from_pretrained`` round-trip.

Nothing here imports ``transformers``: the functions read a Hugging Face model's ``config`` and its
module names (``q_proj`` ... ``down_proj``), so :func:`~tg_kernels.prune` (``uniform=True``) and
:class:`~tg_kernels.integrations.hf.PruningTrainer` share them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tg_kernels.pruning.budget import Budget


@torch.no_grad()
def divisible_stream(model: nn.Module, budget: Budget, tol: float = 0.01) -> int:
    """Make the kept hidden size a multiple of the kept attention heads, as a Llama config requires
    (``hidden_size % num_attention_heads == 0``, checked when a config is saved or loaded).

    Flips the residual stream's gates nearest their threshold to the nearest multiple, then lets
    :meth:`Budget.settle` land the ratio again with the stream and the heads fixed (a settle that
    opened a KV group would change the multiple); where it cannot from there (every MLP unit
    already open, say), the multiple on the other side. For Llama-like models (the
    stream is the input embedding's group, heads are the groups of the ``q_proj`` layers). Returns
    the gates flipped.
    """
    bank = budget.bank
    config = getattr(model, "config", None)
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    names = {module: name for name, module in model.named_modules()}
    stream = next((g.key for g in bank.groups if names.get(embedding) in g.producers), None)
    heads = [g.key for g in bank.groups if any(p.endswith("q_proj") for p in g.producers)]
    if config is None or stream is None or not heads:
        return 0
    per_group = config.num_attention_heads // config.num_key_value_heads  # query heads per KV group
    n_heads = {bank.gates[key].num_open() for key in heads}
    if len(n_heads) != 1:
        return 0  # the layers differ: fit_config will say so
    h = n_heads.pop() * per_group
    gate = bank.gates[stream]
    n = gate.num_open()
    if n % h == 0:
        return 0
    down, up = n - n % h, n - n % h + h
    wants = sorted((m for m in (down, up) if max(h, gate.min_open) <= m <= gate.num_channels), key=lambda m: abs(m - n))
    gates = list({id(g): g for g in bank.gates.values()}.values())
    before = [g.weight.detach().clone() for g in gates]
    tried = []
    for want in wants:  # the nearest multiple first; the other where settle cannot land the ratio from it
        for g, w in zip(gates, before):
            g.weight.copy_(w)
        _open_most(gate.weight, want)
        flips = abs(want - n) + budget.settle(tol, fixed=(stream, *heads))  # the heads too: h must stay
        status = budget.status()
        if status.within(tol):
            return flips
        tried.append((abs(status.ratio / status.target - 1), want))
    if not tried:
        return 0
    for g, w in zip(gates, before):
        g.weight.copy_(w)
    want = min(tried)[1]
    _open_most(gate.weight, want)
    return abs(want - n) + budget.settle(tol, fixed=(stream, *heads))


def _open_most(w: torch.Tensor, k: int) -> None:
    """Open the ``k`` most open channels of gate weights ``w`` and close the rest (the nearest
    flips: weights just past the threshold)."""
    order = torch.argsort(w, descending=True, stable=True)  # most open first
    new = w.clone()
    new[order[:k]] = new[order[:k]].clamp_min(1e-3)
    new[order[k:]] = new[order[k:]].clamp_max(-1e-3)
    w.copy_(new)


_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def _decoder_widths(model: nn.Module) -> dict[str, set[int]]:
    """The widths of every Llama-like attention (``q_proj`` ... ``o_proj``) and MLP (``gate_proj``,
    ``up_proj``, ``down_proj``) in ``model``: heads, KV heads, head dims and MLP units, as sets."""
    widths: dict[str, set[int]] = {k: set() for k in ("heads", "kv_heads", "head_dim", "intermediate")}
    for name, module in model.named_modules():
        if all(isinstance(getattr(module, n, None), nn.Linear) for n in _ATTENTION):
            head_dim = getattr(module, "head_dim", None)
            if not isinstance(head_dim, int):
                raise ValueError(f"fit_config(): attention '{name}' has no int head_dim")
            widths["head_dim"].add(head_dim)
            widths["heads"].add(module.q_proj.out_features // head_dim)
            widths["kv_heads"].add(module.k_proj.out_features // head_dim)
        elif all(isinstance(getattr(module, n, None), nn.Linear) for n in _MLP):
            widths["intermediate"].add(module.gate_proj.out_features)
    return widths


def is_llama_like(model: nn.Module) -> bool:
    """Whether :func:`fit_config` knows ``model``: a Hugging Face model (a ``config`` and input
    embeddings) with Llama-like attention and MLP modules."""
    if getattr(model, "config", None) is None or not hasattr(model, "get_input_embeddings"):
        return False
    widths = _decoder_widths(model)
    return bool(widths["heads"]) and bool(widths["intermediate"])


def fit_config(model: nn.Module) -> Any:
    """Set an exported model's ``config`` to its widths, so that ``save_pretrained`` /
    ``from_pretrained`` round-trip it; returns the config.

    For decoder models built like Llama (attention with ``q_proj``, ``k_proj``, ``v_proj``,
    ``o_proj``; an MLP with ``gate_proj``, ``up_proj``, ``down_proj``; Llama, Mistral, Qwen2 and
    their kin): ``hidden_size``, ``num_attention_heads``, ``num_key_value_heads``, ``head_dim`` and
    ``intermediate_size``. Raises ``ValueError`` where the layers' widths differ (prune with
    ``uniform=True``: ``tg.prune``, ``PruningArguments``; or save with ``tg.save``) or
    where the rotary table the config would rebuild differs from the model's (head dims pruned).
    """
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_input_embeddings"):
        raise ValueError(f"fit_config() needs a Hugging Face PreTrainedModel, got {type(model).__name__}")
    widths = _decoder_widths(model)
    if not widths["heads"] or not widths["intermediate"]:
        raise ValueError(f"fit_config() knows Llama-like decoders; {type(model).__name__} has no q/k/v/o and MLP")
    mixed = {k: sorted(v) for k, v in widths.items() if len(v) > 1}
    if mixed:
        raise ValueError(
            f"fit_config(): the layers' widths differ ({mixed}), which one config cannot describe; prune with "
            "uniform=True (tg.prune, PruningArguments; GateBank.make_uniform()), or save with tg.save and load "
            "with tg.load"
        )
    new = {
        "hidden_size": model.get_input_embeddings().embedding_dim,
        "num_attention_heads": widths["heads"].pop(),
        "num_key_value_heads": widths["kv_heads"].pop(),
        "head_dim": widths["head_dim"].pop(),
        "intermediate_size": widths["intermediate"].pop(),
    }
    for key, value in new.items():
        setattr(config, key, value)
    for name, module in model.named_modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor) and getattr(module, "config", None) is config:
            fresh = type(module)(config).inv_freq
            if fresh.shape != inv_freq.shape or not torch.allclose(fresh.to(inv_freq.dtype), inv_freq):
                raise ValueError(
                    f"fit_config(): the rotary table of '{name}' keeps a subset of its frequencies (head dims were "
                    "pruned), which a config rebuilding it from head_dim cannot hold; prune with uniform=True "
                    "(head dims held whole), or save with tg.save and load with tg.load"
                )
    return config


__all__ = ["divisible_stream", "fit_config", "is_llama_like"]
