"""What the graph pass found: one row per candidate site, one per module it could not trace.

:func:`tritskip.graph_pass.explain` returns a :class:`Report` without changing the model;
:func:`tritskip.graph_pass.optimize` returns one next to the rewritten model when asked.
``str(report)`` is a plain-text table; the fields are there for programs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

__all__ = ["Report", "Site", "Untraced"]


@dataclass(frozen=True)
class Site:
    """A Linear whose output flows into an epilogue the fused op can absorb.

    ``module`` is the qualified name of the ``nn.Linear`` (``"blocks.3.fc"``) or, for a
    functional ``F.linear`` call, of the module whose ``forward`` makes the call (``""`` is the
    model itself). ``source`` is ``"path/to/file.py:line"`` of the call, ``""`` when unknown.
    ``pattern`` spells the chain, e.g. ``"Linear → relu → add → relu"``; for a site left alone
    it ends at the op that stopped the match. ``reason`` says why a site was left; ``note``
    says why a fused site did not absorb more (the chain went on to an op it could not take).
    ``shape`` is the output shape seen with ``example_inputs``, ``None`` without them.
    """

    module: str
    source: str
    pattern: str
    fused: bool
    reason: str = ""
    note: str = ""
    shape: tuple[int, ...] | None = None
    already_fused: bool = False


@dataclass(frozen=True)
class Untraced:
    """A module that ``torch.fx`` could not trace whole; its children were tried one by one."""

    module: str
    reason: str


@dataclass
class Report:
    """Every candidate site in graph order, and every module that was not traced whole.

    From the Dynamo front end (``explain(..., dynamo=True)``), ``graph_breaks`` lists where
    Dynamo split the model into several graphs (``"file:line: reason"``); each graph is
    matched on its own, so a chain across a break is not fused.
    """

    sites: list[Site] = field(default_factory=list)
    untraced: list[Untraced] = field(default_factory=list)
    graph_breaks: list[str] = field(default_factory=list)

    @property
    def fused(self) -> list[Site]:
        return [s for s in self.sites if s.fused]

    @property
    def left(self) -> list[Site]:
        return [s for s in self.sites if not s.fused]

    def __len__(self) -> int:
        return len(self.sites)

    def __iter__(self) -> Iterator[Site]:
        return iter(self.sites)

    def summary(self) -> str:
        newly = sum(1 for s in self.sites if s.fused and not s.already_fused)
        already = sum(1 for s in self.sites if s.already_fused)
        parts = [f"{len(self.sites)} site{'s' if len(self.sites) != 1 else ''}"]
        parts.append(f"{newly} fused")
        if already:
            parts.append(f"{already} already fused")
        parts.append(f"{len(self.left)} left")
        if self.untraced:
            parts.append(f"{len(self.untraced)} module(s) not traced whole")
        if self.graph_breaks:
            parts.append(f"{len(self.graph_breaks)} graph break(s)")
        return ", ".join(parts)

    def __str__(self) -> str:
        lines = [self.summary()]
        if self.sites:
            header = ("module", "source", "pattern", "status", "reason")
            rows = [header] + [
                (
                    s.module or "<model>",
                    _short_source(s.source),
                    s.pattern,
                    "already fused" if s.already_fused else "fused" if s.fused else "left",
                    s.reason or s.note,
                )
                for s in self.sites
            ]
            lines.append("")
            lines.extend(_table(rows))
        if self.untraced:
            lines.append("")
            lines.append("not traced whole (children optimized one by one):")
            lines.extend(f"  {u.module or '<model>'}: {u.reason}" for u in self.untraced)
        if self.graph_breaks:
            lines.append("")
            lines.append("Dynamo graph breaks (each graph is matched on its own):")
            lines.extend(f"  {b}" for b in self.graph_breaks)
        return "\n".join(lines)


def _short_source(source: str) -> str:
    if not source:
        return "?"
    path, _, line = source.rpartition(":")
    return f"{os.path.basename(path)}:{line}"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for k, row in enumerate(rows):
        out.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return out
