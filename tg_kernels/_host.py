"""Host (CPU) copies of small device tensors that the skipping layers plan from (gate values).

Planning which channels a skipping call computes needs the gate values on the host, and reading a
CUDA tensor on the host is a synchronisation. Two caches keep those reads rare:

- **Per gate module** (:class:`~tg_kernels.TrainableGate` in the limit form): its values are
  ``gate.open_mask()`` as 0/1, so they are derived on the host from a host copy of the weight
  (``gate.open_mask(host_weight)``: this module only caches, the gate says what is open) and
  remembered while the weight is unchanged: the same parameter object, ``_version`` and storage, the
  same ``min_open``, and no optimizer step since (every ``torch.optim`` step counts as a change:
  fused optimizers do not bump ``_version``). When one gate is stale, every tracked gate on its
  device that is stale too is read in the same transfer. So a model of gated layers synchronises
  once per training step (at the first layer after the step) and not at all while its gates stay
  unchanged (evaluation, gradient accumulation, frozen gates without an optimizer step).
- **Per tensor** (any gate tensor handed to a skipping op): its host copy and the plans made from
  it, so that the backward, which receives the same saved tensor, plans nothing. A tensor produced
  by a tracked gate (:func:`track`) resolves to the gate module's host copy without a transfer.

What the version check cannot see: in-place edits through ``weight.data`` (or any write that
bypasses PyTorch's version counter, outside an optimizer step). After such an edit call
:func:`forget` (``tg_kernels.nn.forget_open_sets``).
"""

from __future__ import annotations

import functools
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.optim.optimizer import register_optimizer_step_post_hook


@dataclass(eq=False)
class HostValues:
    """A host copy of a small device tensor and what planners derived from it (``plans``, by key)."""

    host: Tensor
    plans: dict = field(default_factory=dict)


def _trackable(t: Tensor) -> bool:
    """Plain eager tensors only: fakes, functional wrappers and tracing never see the caches."""
    return not torch.compiler.is_compiling() and type(t) in (Tensor, torch.nn.Parameter)


def _version(t: Tensor) -> int:
    """The version counter; inference tensors have none (-1; only tensors made by tracked gates are
    remembered then: see :func:`fetch`)."""
    return -1 if t.is_inference() else t._version


def _needs_transfer(t: Tensor) -> bool:
    return t.device.type != "cpu"


def _device_to_host(tensors: list[Tensor]) -> list[Tensor]:
    """The one synchronising step: copy device tensors (of one device) to the host in a single transfer."""
    dtype = functools.reduce(torch.promote_types, [t.dtype for t in tensors])  # exact: zeros stay zeros
    flat = torch.cat([t.detach().flatten().to(dtype) for t in tensors]) if len(tensors) > 1 else None
    host = (flat if flat is not None else tensors[0].detach().flatten()).to("cpu")
    if flat is None:
        return [host.view(tensors[0].shape)]
    pieces = torch.split(host, [t.numel() for t in tensors])
    return [piece.view(t.shape) for piece, t in zip(pieces, tensors)]


# ---------------------------------------------------------------------------------------- gate modules


@dataclass(eq=False)
class _GateState:
    """What a gate module's values depend on, at one moment."""

    weight: weakref.ref
    version: int
    data_ptr: int
    device: torch.device
    min_open: int
    epoch: int

    def matches(self, other: _GateState) -> bool:
        return (
            self.weight() is other.weight()
            and self.version == other.version
            and self.data_ptr == other.data_ptr
            and self.device == other.device
            and self.min_open == other.min_open
            and self.epoch == other.epoch
        )


class _Gates:
    """Host values of tracked gate modules, each with the state it was read at."""

    def __init__(self) -> None:
        self.entries: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # module -> (state, values) | None
        self.epoch = 0  # bumped by every optimizer step
        self.lock = threading.Lock()  # DataParallel replicas plan from several threads


_gates = _Gates()


def _usable(gate) -> bool:
    """Limit-form gates with a plain weight: their values are exactly the open mask."""
    return gate.M is None and _trackable(gate.weight) and not gate.weight.is_meta


def _state(gate) -> _GateState:
    w = gate.weight
    return _GateState(weakref.ref(w), w._version, w.data_ptr(), w.device, gate.min_open, _gates.epoch)


def _fresh_values(gate) -> HostValues | None:
    entry = _gates.entries.get(gate)
    if entry is None or not entry[0].matches(_state(gate)):
        return None
    return entry[1]


def _refresh(gates: Sequence, extra: Sequence[Tensor] = ()) -> list[Tensor]:
    """Read the weights of `gates`, of every other stale tracked gate on their (accelerator) devices, and `extra`
    (host copies returned) in one transfer per device; nothing is read for fresh gates."""
    with _gates.lock, torch.inference_mode(False):  # cached tensors must outlive an inference-mode caller
        for gate in gates:
            _gates.entries.setdefault(gate, None)
        devices = {g.weight.device for g in gates} | {t.device for t in extra}
        if not any(_needs_transfer(t) for t in [*(g.weight for g in gates), *extra]):
            # host tensors: reading them costs no transfer, so only these gates (not a scan of all)
            tracked = list(dict.fromkeys(gates))
        else:
            tracked = [g for g in (ref() for ref in list(_gates.entries.data)) if g is not None]
        stale = [g for g in tracked if g.weight.device in devices and _usable(g) and _fresh_values(g) is None]
        states = [_state(g) for g in stale]
        hosts = _to_host_plain([g.weight for g in stale] + list(extra))
        for gate, state, host_weight in zip(stale, states, hosts):
            values = gate.open_mask(host_weight).to(host_weight.dtype)  # the gate's own definition
            _gates.entries[gate] = (state, HostValues(values))
    return hosts[len(stale) :]


def _bump_epoch(*_) -> None:
    _gates.epoch += 1


register_optimizer_step_post_hook(_bump_epoch)


def epoch() -> int:
    """A counter that moves on every ``torch.optim`` step and every :func:`forget`: caches keyed on
    tensor versions add it, since fused optimizers update parameters without bumping ``_version``."""
    return _gates.epoch


def forget() -> None:
    """Forget every remembered host copy: the next planning call reads its gate again (needed only after
    gate weights changed without PyTorch seeing it, e.g. in-place through ``.data``)."""
    _gates.entries.clear()
    _tensors.entries.clear()
    _bump_epoch()


# -------------------------------------------------------------------------------------- single tensors


class _FromGates:
    """Resolves the host values of a tensor made of gate modules' values and runs of ones (``int`` pieces),
    provided the gates are still in the state they had when the tensor was made."""

    def __init__(self, pieces: Sequence, cache: ConcatCache | None) -> None:
        self.pieces = list(pieces)
        self.states = [_state(p) for p in self.pieces if not isinstance(p, int)]
        self.cache = cache

    @property
    def gates(self) -> list:
        return [p for p in self.pieces if not isinstance(p, int)]

    def __call__(self) -> HostValues | None:
        gates = self.gates
        if any(not _usable(g) or not s.matches(_state(g)) for g, s in zip(gates, self.states)):
            return None  # changed since the tensor was made: read the tensor itself
        if any(_fresh_values(g) is None for g in gates):
            _refresh(gates)
        parts = [p if isinstance(p, int) else _fresh_values(p) for p in self.pieces]
        if len(parts) == 1 and isinstance(parts[0], HostValues):
            return parts[0]  # the gate's own host values and plans (0/1 values: any float dtype holds them)
        return self.cache(parts) if self.cache is not None else _concat(parts)


def _concat(parts: list) -> HostValues:
    with torch.inference_mode(False):
        pieces = [torch.ones(p) if isinstance(p, int) else p.host.float() for p in parts]
        return HostValues(torch.cat(pieces) if pieces else torch.zeros(0))


class ConcatCache:
    """Remembers the host values of one concatenation while every piece's host values are the same objects
    (so plans made from it survive across forwards). Held by whoever builds such tensors (InputGate)."""

    def __init__(self) -> None:
        self.key: list = []
        self.values: HostValues | None = None

    def __call__(self, parts: list) -> HostValues:
        same = len(parts) == len(self.key) and all(a is b or a == b for a, b in zip(parts, self.key))
        if not same or self.values is None:
            self.key, self.values = parts, _concat(parts)
        return self.values


class _Tensors:
    """Host values per tensor object (and version); an entry may be lazy (resolved by a provider)."""

    def __init__(self) -> None:
        self.entries: dict[int, list] = {}  # id -> [ref, version, HostValues | None, provider | None]

    def _entry(self, t: Tensor) -> list | None:
        entry = self.entries.get(id(t))
        if entry is None or entry[0]() is not t or entry[1] != _version(t):
            return None
        return entry

    def get(self, t: Tensor) -> HostValues | None:
        entry = self._entry(t)
        if entry is None:
            return None
        if entry[2] is None and entry[3] is not None:
            entry[2] = entry[3]()
            entry[3] = None
        return entry[2]

    def provider(self, t: Tensor) -> Callable | None:
        entry = self._entry(t)
        return entry[3] if entry is not None and entry[2] is None else None

    def put(self, t: Tensor, values: HostValues | None, provider: Callable | None = None) -> None:
        key = id(t)
        entries = self.entries
        ref = weakref.ref(t, lambda _, key=key: entries.pop(key, None))
        entries[key] = [ref, _version(t), values, provider]


_tensors = _Tensors()


def track(t: Tensor, pieces: Sequence, cache: ConcatCache | None = None) -> None:
    """Record that `t` is the concatenation of the values of `pieces` (limit-form gate modules, and
    ints for runs of ones), so its host copy comes from theirs without a transfer."""
    if _trackable(t) and all(isinstance(p, int) or _usable(p) for p in pieces):
        _tensors.put(t, None, _FromGates(pieces, cache))


def remember(t: Tensor, values: HostValues) -> None:
    """Record `values` as the host values of `t` (computed on the host from other host values)."""
    if _trackable(t):
        _tensors.put(t, values)


def fetch(tensors: Sequence[Tensor | None]) -> None:
    """Make the host values of several tensors known, with at most one transfer per device."""
    wanted = [t for t in tensors if t is not None and _trackable(t) and _tensors.get(t) is None]
    # inference tensors have no version counter: remembered only when made by tracked gates
    wanted = [t for t in wanted if not t.is_inference() or _tensors.provider(t) is not None]
    if not wanted:
        return
    direct = [t for t in wanted if _tensors.provider(t) is None]
    gates = [g for t in wanted if (p := _tensors.provider(t)) is not None for g in p.gates]
    hosts = _refresh(gates, direct) if gates else _to_host_plain(direct)
    for t, host in zip(direct, hosts):
        _tensors.put(t, HostValues(host))
    late = [t for t in wanted if _tensors.get(t) is None]  # a tracked tensor whose gates changed since
    for t, host in zip(late, _to_host_plain(late)):
        if not t.is_inference():
            _tensors.put(t, HostValues(host))


def _to_host_plain(tensors: list[Tensor]) -> list[Tensor]:
    """Host copies without a snapshot on CPU (the tensor itself), one transfer for device tensors."""
    if not tensors:
        return []
    with torch.inference_mode(False):
        by_device: dict[torch.device, list[Tensor]] = {}
        for t in tensors:
            if _needs_transfer(t):
                by_device.setdefault(t.device, []).append(t)
        copies = {id(t): host for group in by_device.values() for t, host in zip(group, _device_to_host(group))}
        return [copies[id(t)] if _needs_transfer(t) else t.detach() for t in tensors]


def host_values(t: Tensor) -> HostValues:
    """`t`'s host values: remembered, resolved from tracked gates, or read (one transfer on a device)."""
    if not _trackable(t):
        return HostValues(t.detach().to("cpu"))
    values = _tensors.get(t)
    if values is None:
        fetch([t])
        values = _tensors.get(t)
    return values if values is not None else HostValues(_to_host_plain([t])[0])  # not remembered
