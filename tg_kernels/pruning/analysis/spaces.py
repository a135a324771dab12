"""Channel-space bookkeeping: a union-find over channel spaces.

A *space* is a set of channels created by one producer (a Conv or Linear output, or a piece of it
when the model splits that output). Ops that couple channels one-to-one (a residual add, a
multiply, a depthwise conv) merge spaces, so that they share one gate; a space that reaches
something the rules cannot follow is *fixed* (kept whole, ungated) with a reason. Keys are stable
across analysis passes, so that what one pass learns (a space to fix, a place to cut a producer's
output into pieces) carries into the next.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass


@dataclass
class Space:
    """One channel space: ``size`` channels named ``key``, from ``producer`` (a module name or None)."""

    size: int
    key: str
    producer: str | None
    fixed: str | None = None
    unit: int = 1  # entries of the producer's output per channel (a head of ``unit`` entries is one channel)


class Spaces:
    """Union-find over :class:`Space` s, with the fixed reasons remembered across passes.

    Args:
        forced_fixed: space key -> reason, learned by earlier passes (read, and added to through
            :attr:`new_fixed`).
    """

    def __init__(self, forced_fixed: dict[str, str]) -> None:
        self.spaces: list[Space] = []
        self.parent: list[int] = []
        self.by_key: dict[str, int] = {}
        self.forced_fixed = forced_fixed
        self.new_fixed: dict[str, str] = {}

    def new(self, size: int, key: str, producer: str | None, fixed: str | None = None, unit: int = 1) -> int:
        """The space named ``key`` (made on first use)."""
        if key in self.by_key:
            return self.by_key[key]
        sid = len(self.spaces)
        self.spaces.append(Space(size, key, producer, fixed or self.forced_fixed.get(key), unit))
        self.parent.append(sid)
        self.by_key[key] = sid
        return sid

    def size(self, s: int) -> int:
        return self.spaces[s].size

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)

    def roots(self) -> dict[int, list[int]]:
        """Every class of merged spaces: its root (the smallest space id) -> its spaces, in order."""
        classes: dict[int, list[int]] = {}
        for s in range(len(self.spaces)):
            classes.setdefault(self.find(s), []).append(s)
        return classes

    def members(self, s: int) -> list[int]:
        root = self.find(s)
        return [i for i in range(len(self.spaces)) if self.find(i) == root]

    def fix(self, parts: Iterable[int], reason: str) -> None:
        """Keep these spaces whole; remembered for the next pass so that it agrees."""
        for p in parts:
            space = self.spaces[p]
            if space.fixed is None:
                space.fixed = reason
            if space.key not in self.forced_fixed:
                self.new_fixed.setdefault(space.key, reason)

    def is_fixed(self, s: int) -> bool:
        return any(self.spaces[i].fixed for i in self.members(s))

    def __len__(self) -> int:
        return len(self.spaces)


def remap(parts: Iterable[tuple], root_of: Mapping[int, int]) -> tuple:
    """``(space, size, ...)`` parts with each space replaced by ``root_of[space]`` (its group), or by
    None where ``root_of`` has none (a space that is not gated; None stays None)."""
    return tuple((root_of.get(s), *rest) for s, *rest in parts)


def remap_dims(dims: Iterable[Iterable[tuple]], root_of: Mapping[int, int]) -> tuple:
    """Head-dim gates per part (``GatePoint.dims``, ``LayerCost.in_dims``, ...) remapped as by
    :func:`remap`; empty where none of them stays gated."""
    out = tuple(remap(d, root_of) for d in dims)
    return out if any(r is not None for d in out for r, *_ in d) else ()


__all__ = ["Space", "Spaces", "remap", "remap_dims"]
