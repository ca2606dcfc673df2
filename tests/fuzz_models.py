"""Random models built from skip-connection patterns, for differential tests of the graph pass.

A :class:`Spec` lists the steps of a model; :class:`FuzzModel` builds and runs it, and
``str(spec)`` prints it as the Python a person would write, so a failing case reads as a model.
:func:`specs` is the hypothesis strategy. Each step reads the running value ``h`` (and, for long
skips, earlier ones) and writes a new ``h``:

- ``add``: ``outer(merge(drop(scale(inner(fc(h)))), r))`` with every spelling of the add and
  the activations, a residual from ``skip`` steps back, a broadcasting one, or a view;
- ``cat``: ``torch.cat`` of the Linear's result with one or two earlier values, in any order;
- ``act``: ``inner(fc(h))``; ``norm``: ``LayerNorm``; ``twice``: one Linear called twice;
- ``block``: tritskip's own ``Residual``/``ConcatSkip``.

Linears may share weights with an earlier one of the same shape (``tie``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

from tritskip.blocks import ConcatSkip, Residual

# Activation spellings: key -> (source text, how to apply it: module factory or function)
ACTIVATIONS: dict[str, tuple[str, object]] = {
    "nn.ReLU": ("nn.ReLU()", lambda: nn.ReLU()),
    "nn.ReLU(inplace)": ("nn.ReLU(inplace=True)", lambda: nn.ReLU(inplace=True)),
    "F.relu": ("F.relu(v)", F.relu),
    "F.relu(inplace)": ("F.relu(v, inplace=True)", lambda v: F.relu(v, inplace=True)),
    "torch.relu": ("torch.relu(v)", torch.relu),
    ".relu()": ("v.relu()", lambda v: v.relu()),
    ".relu_()": ("v.relu_()", lambda v: v.relu_()),
    "nn.LeakyReLU": ("nn.LeakyReLU(0.2)", lambda: nn.LeakyReLU(0.2)),
    "F.leaky_relu": ("F.leaky_relu(v, 0.1)", lambda v: F.leaky_relu(v, 0.1)),
    "nn.GELU": ("nn.GELU()", lambda: nn.GELU()),
    "F.gelu(tanh)": ("F.gelu(v, approximate='tanh')", lambda v: F.gelu(v, approximate="tanh")),
    "gelu_new": ("0.5 * v * (1 + tanh(...))", None),  # written out, as GPT-2 does
    "nn.SiLU": ("nn.SiLU()", lambda: nn.SiLU()),
    "F.silu": ("F.silu(v)", F.silu),
    "v * sigmoid(v)": ("v * torch.sigmoid(v)", None),
    "nn.Tanh": ("nn.Tanh()", lambda: nn.Tanh()),
    "torch.tanh": ("torch.tanh(v)", torch.tanh),
    ".tanh()": ("v.tanh()", lambda v: v.tanh()),
    "nn.Sigmoid": ("nn.Sigmoid()", lambda: nn.Sigmoid()),
    ".sigmoid()": ("v.sigmoid()", lambda v: v.sigmoid()),
    "F.softplus": ("F.softplus(v)", F.softplus),  # not an epilogue activation: ends a chain
}
MODULE_ACTIVATIONS = {k for k, (_, f) in ACTIVATIONS.items() if k.startswith("nn.")}

# Add spellings, with y the Linear's branch and r the residual.
MERGES = {
    "y + r": lambda y, r: y + r,
    "r + y": lambda y, r: r + y,
    "torch.add(y, r)": lambda y, r: torch.add(y, r),
    "torch.add(r, y, alpha=0.5)": lambda y, r: torch.add(r, y, alpha=0.5),
    "torch.add(y, r, alpha=2)": lambda y, r: torch.add(y, r, alpha=2),
    "y.add(r)": lambda y, r: y.add(r),
    "y += r": None,
    "r - y": lambda y, r: r - y,
    "y - r": lambda y, r: y - r,
    "torch.sub(r, y, alpha=2)": lambda y, r: torch.sub(r, y, alpha=2),
    "y.sub_(r)": lambda y, r: y.sub_(r),
    "r2 = r * 1; r2 += y": None,
}
SCALES = ("y * 0.5", "0.5 * y", "y * g (per channel)", "s * y (0-d)", "y * w (shape [1, N])")
DROPOUTS = ("nn.Dropout(0.3)", "nn.Dropout(0.0)", "F.dropout(training=False)", "F.dropout(p=0.3)")
CATS = ("torch.cat", "torch.concat", "torch.concatenate(axis)", "torch.cat(dim=rank-1)")
SKIP_VIEWS = ("chunk", "stride", "broadcast [N]", "broadcast [1, N]", "broadcast column")


@dataclass(frozen=True)
class Step:
    kind: str  # add, cat, act, norm, twice, block
    width: int = 0  # the Linear's output width where free to choose
    inner: str | None = None
    outer: str | None = None
    scale: str | None = None
    dropout: str | None = None
    dropout_first: bool = False  # dropout before the inner activation instead of the merge
    merge: str = "y + r"  # add spelling, cat spelling, or block kind
    skip: int = 0  # residual/shortcut from this many steps before the step's input
    skip_view: str | None = None
    position: int = 0  # index of the Linear's part in a concatenation
    parts: int = 2
    escape: bool = False  # the Linear's output is also read elsewhere
    tie: int | None = None  # share the weight of this earlier step's Linear
    bias: bool = True


@dataclass(frozen=True)
class Spec:
    in_width: int
    lead: tuple[int, ...]
    steps: tuple[Step, ...]
    layout: str = "contiguous"  # contiguous, transposed, strided
    example_inputs: bool = False
    specials: bool = False  # the input holds NaN, +Inf and -Inf
    widths: tuple[int, ...] = field(default=(), compare=False)

    def __str__(self) -> str:
        lines = [
            f"x: [{', '.join(map(str, (*self.lead, self.in_width)))}] float, {self.layout}"
            f"{', with NaN and Inf' if self.specials else ''}"
            f"{', shapes from example_inputs' if self.example_inputs else ''}"
        ]
        for i, s in enumerate(self.steps):
            lines.append(f"h{i + 1} = {describe(i, s)}")
        return "\n".join(lines)


def describe(i: int, s: Step) -> str:
    h = f"h{i}"
    src = f"h{i - s.skip}" if s.skip_view is None else f"{s.skip_view} of {h}"
    if s.skip_view in ("broadcast [N]", "broadcast [1, N]"):
        src = f"r{i + 1} (a parameter of shape {s.skip_view[10:]})"
    elif s.skip_view == "broadcast column":
        src = f"{h}[..., :1]"
    tie = f" [fc{i + 1}.weight is fc{s.tie + 1}.weight]" if s.tie is not None else ""
    y = f"fc{i + 1}({h}{'' if s.bias else ', no bias'})"
    if s.kind == "norm":
        return f"LayerNorm({h})"
    if s.kind == "block":
        return f"{s.merge}(Linear -> {s.width}, activation={s.outer}) ({h})"
    if s.dropout and s.dropout_first:
        y = f"{s.dropout}({y})"
    if s.inner:
        y = f"{s.inner}[{y}]"
    if s.scale:
        y = f"{s.scale}[y={y}]"
    if s.dropout and not s.dropout_first:
        y = f"{s.dropout}({y})"
    if s.escape:
        y = f"{y} (also read again)"
    if s.kind == "act":
        return y + tie
    if s.kind == "twice":
        return f"fc{i + 1}(a) + a with a = {s.outer}[{y} + {h}]{tie}"
    if s.kind == "cat":
        parts = [src] * (s.parts - 1)
        parts.insert(s.position, y)
        return f"{s.merge}([{', '.join(parts)}]){tie}"
    return f"{s.outer or ''}[{s.merge} with y = {y}, r = {src}]{tie}"


def _gelu_new(v):
    return 0.5 * v * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v**3)))


class FuzzModel(nn.Module):
    """The model a :class:`Spec` describes; ``forward`` interprets the steps."""

    def __init__(self, spec: Spec) -> None:
        super().__init__()
        self.spec = spec
        widths = [spec.in_width]
        linears: list[nn.Linear | None] = []
        for i, s in enumerate(spec.steps):
            w_in = widths[-1]
            if s.kind == "norm":
                self.add_module(f"norm{i}", nn.LayerNorm(w_in))
                widths.append(w_in)
                linears.append(None)
                continue
            if s.kind == "block":
                fc = nn.Linear(w_in, s.width)
                block = (Residual if s.merge == "Residual" else ConcatSkip)(fc, activation=s.outer)
                self.add_module(f"block{i}", block)
                widths.append(s.width + (w_in if s.merge == "ConcatSkip" else 0))
                linears.append(None)
                continue
            x_width, r_width = _split(w_in, s.skip_view)
            out = _linear_width(s, widths, r_width)
            fc = nn.Linear(x_width, out, bias=s.bias)
            tied = None if s.tie is None else linears[s.tie]
            if tied is not None and tied.weight.shape == fc.weight.shape:
                fc.weight = tied.weight
            self.add_module(f"fc{i}", fc)
            linears.append(fc)
            for where, key in (("inner", s.inner), ("outer", s.outer)):
                if key in MODULE_ACTIVATIONS:
                    self.add_module(f"{where}{i}", ACTIVATIONS[key][1]())
            if s.dropout and s.dropout.startswith("nn."):
                self.add_module(f"drop{i}", nn.Dropout(0.3 if "0.3" in s.dropout else 0.0))
            if s.scale == "y * g (per channel)":
                self.register_parameter(f"g{i}", nn.Parameter(torch.rand(out) + 0.5))
            elif s.scale == "s * y (0-d)":
                self.register_parameter(f"s{i}", nn.Parameter(torch.tensor(0.7)))
            elif s.scale == "y * w (shape [1, N])":
                self.register_parameter(f"w{i}", nn.Parameter(torch.rand(1, out) + 0.5))
            if s.skip_view in ("broadcast [N]", "broadcast [1, N]"):
                shape = (out,) if s.skip_view == "broadcast [N]" else (1, out)
                self.register_parameter(f"r{i}", nn.Parameter(torch.randn(shape)))
            if s.kind == "cat":
                short = r_width if s.skip_view else widths[-1 - s.skip]
                widths.append(out + (s.parts - 1) * short)
            else:
                widths.append(out)
        self.widths = tuple(widths)

    # -- pieces ---------------------------------------------------------------------------------

    def _act(self, i: int, where: str, key: str | None, v):
        if key is None:
            return v
        if key in MODULE_ACTIVATIONS:
            return getattr(self, f"{where}{i}")(v)
        if key == "gelu_new":
            return _gelu_new(v)
        if key == "v * sigmoid(v)":
            return v * torch.sigmoid(v)
        return ACTIVATIONS[key][1](v)

    def _dropout(self, i: int, s: Step, v):
        if s.dropout is None:
            return v
        if s.dropout.startswith("nn."):
            return getattr(self, f"drop{i}")(v)
        if s.dropout == "F.dropout(training=False)":
            return F.dropout(v, 0.3, training=False)
        return F.dropout(v, 0.3)

    def _scale(self, i: int, s: Step, y):
        if s.scale is None:
            return y
        if s.scale == "y * 0.5":
            return y * 0.5
        if s.scale == "0.5 * y":
            return 0.5 * y
        if s.scale == "y * g (per channel)":
            return y * getattr(self, f"g{i}")
        if s.scale == "s * y (0-d)":
            return getattr(self, f"s{i}") * y
        return y * getattr(self, f"w{i}")

    def _branch(self, i: int, s: Step, x):
        y = getattr(self, f"fc{i}")(x)
        side = None
        if s.escape:
            side = y.mean(-1, keepdim=True)
        if s.dropout_first:
            y = self._dropout(i, s, y)
        y = self._act(i, "inner", s.inner, y)
        y = self._scale(i, s, y)
        if not s.dropout_first:
            y = self._dropout(i, s, y)
        return y, side

    def _inputs(self, i: int, s: Step, hs: list):
        """The Linear's input and the residual/shortcut of step ``i``."""
        h = hs[-1]
        if s.skip_view == "chunk":
            a, b = h.chunk(2, -1)
            return a, b
        if s.skip_view == "stride":
            return h[..., ::2], h[..., 1::2]
        if s.skip_view in ("broadcast [N]", "broadcast [1, N]"):
            return h, getattr(self, f"r{i}")
        if s.skip_view == "broadcast column":
            return h, h[..., :1]
        return h, hs[-1 - s.skip]

    # -- forward --------------------------------------------------------------------------------

    def forward(self, x):
        hs = [x]
        for i, s in enumerate(self.spec.steps):
            h = hs[-1]
            if s.kind == "norm":
                hs.append(getattr(self, f"norm{i}")(h))
                continue
            if s.kind == "block":
                hs.append(getattr(self, f"block{i}")(h))
                continue
            x_in, r = self._inputs(i, s, hs)
            if s.kind == "twice":
                y, side = self._branch(i, s, x_in)
                a = self._act(i, "outer", s.outer, y + r)
                out = getattr(self, f"fc{i}")(a) + a
            elif s.kind == "act":
                out, side = self._branch(i, s, x_in)
            elif s.kind == "cat":
                y, side = self._branch(i, s, x_in)
                parts = [r] * (s.parts - 1)
                parts.insert(s.position, y)
                if s.merge == "torch.cat":
                    out = torch.cat(parts, -1)
                elif s.merge == "torch.concat":
                    out = torch.concat(parts, dim=-1)
                elif s.merge == "torch.concatenate(axis)":
                    out = torch.concatenate(parts, axis=-1)
                else:
                    out = torch.cat(parts, len(self.spec.lead))
            else:
                y, side = self._branch(i, s, x_in)
                if s.merge == "y += r":
                    y += r
                    out = y
                elif s.merge == "r2 = r * 1; r2 += y":
                    out = r * 1.0
                    out += y
                else:
                    out = MERGES[s.merge](y, r)
                out = self._act(i, "outer", s.outer, out)
            if s.escape:
                out = out + side
            hs.append(out)
        return hs[-1]


def _split(width: int, view: str | None) -> tuple[int, int]:
    """Widths of the Linear's input and of the residual for a view of ``h``."""
    if view == "chunk":
        first = -(-width // 2)
        return first, width - first
    if view == "stride":
        return -(-width // 2), width // 2
    return width, width


def _linear_width(s: Step, widths: list[int], r_width: int) -> int:
    if s.kind in ("add", "twice") and s.skip_view is None:
        return widths[-1 - s.skip]
    if s.kind in ("add",) and s.skip_view in ("chunk", "stride"):
        return r_width
    return s.width


# ---------------------------------------------------------------------------------------------
# The strategy

_WIDTHS = st.sampled_from([1, 2, 3, 5, 8, 17])
_TINY_WIDTHS = st.sampled_from([1, 2, 3, 3, 17])  # 17: more than one tile of the kernels
_FUSABLE_ACTS = [k for k in ACTIVATIONS if k != "F.softplus"]


@st.composite
def steps(draw, index: int, widths: list[int], *, dropout: bool, tiny: bool) -> Step:
    w_in = widths[-1]
    kinds = ["add", "add", "add", "cat", "cat", "act", "block"]
    if w_in > 1:
        # LayerNorm over one feature returns its bias; its weight's gradient is then rounding
        # noise times 1/sqrt(eps), which no tolerance derived from eager's error can bound.
        kinds += ["twice", "norm"]
    kind = draw(st.sampled_from(kinds))
    width = draw(_TINY_WIDTHS if tiny else _WIDTHS)
    if kind == "norm":
        return Step("norm")
    if kind == "block":
        merge = draw(st.sampled_from(["Residual", "ConcatSkip"]))
        act = draw(st.sampled_from([None, "relu", "gelu", "tanh"]))
        return Step("block", width=width, merge=merge, outer=act)
    optional_act = st.one_of(st.none(), st.sampled_from(list(ACTIVATIONS)))
    inner = draw(optional_act)
    scale = draw(st.one_of(st.none(), st.sampled_from(SCALES)))
    drop = draw(st.one_of(st.none(), st.sampled_from(DROPOUTS))) if dropout else None
    dropout_first = drop is not None and draw(st.integers(0, 4)) == 0
    escape = draw(st.integers(0, 9)) == 0
    bias = draw(st.integers(0, 4)) > 0
    tie = None
    if index > 0 and draw(st.integers(0, 3)) == 0:
        tie = draw(st.integers(0, index - 1))
    skip = draw(st.integers(0, min(2, len(widths) - 1)))
    skip_view = None
    if kind in ("add", "cat") and draw(st.integers(0, 3)) == 0:
        views = [v for v in SKIP_VIEWS if w_in > 1 or v not in ("chunk", "stride")]
        if kind == "cat":
            views = [v for v in views if v in ("chunk", "stride")]
        skip_view = draw(st.sampled_from(views)) if views else None
        skip = 0
    common = {
        "width": width, "inner": inner, "scale": scale, "dropout": drop, "tie": tie,
        "dropout_first": dropout_first, "escape": escape, "bias": bias, "skip": skip,
        "skip_view": skip_view,
    }  # fmt: skip
    if kind == "act":
        return Step("act", **{**common, "inner": inner or draw(st.sampled_from(_FUSABLE_ACTS))})
    if kind == "twice":
        common.update(skip=0, skip_view=None, escape=False, tie=None)
        return Step("twice", outer=draw(optional_act), **common)
    if kind == "cat":
        parts = draw(st.sampled_from([2, 2, 3]))
        position = draw(st.integers(0, parts - 1))
        return Step("cat", merge=draw(st.sampled_from(CATS)), parts=parts, position=position,
                    **common)  # fmt: skip
    merges = list(MERGES)
    if skip_view is not None and skip_view.startswith("broadcast"):
        merges.remove("r2 = r * 1; r2 += y")  # eager cannot add in place into a smaller tensor
    merge = draw(st.sampled_from(merges))
    return Step("add", merge=merge, outer=draw(optional_act), **common)


@st.composite
def specs(draw, *, dropout: bool = True, tiny: bool = False) -> Spec:
    rank = draw(st.integers(2, 4))
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=rank - 1, max_size=rank - 1)))
    if draw(st.integers(0, 19)) == 0:
        lead = (0, *lead[1:])  # an empty batch
    in_width = draw(_TINY_WIDTHS if tiny else _WIDTHS)
    widths = [in_width]
    out: list[Step] = []
    for i in range(draw(st.integers(1, 2 if tiny else 4))):
        step = draw(steps(i, widths, dropout=dropout, tiny=tiny))
        out.append(step)
        model = FuzzModel(Spec(in_width, lead, tuple(out)))
        if step.tie is not None:  # only a Linear of the same shape can share the weight
            a, b = getattr(model, f"fc{i}"), getattr(model, f"fc{step.tie}", None)
            if b is None or a.weight is not b.weight:
                out[-1] = replace(step, tie=None)
        widths = list(model.widths)
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    specials = draw(st.integers(0, 4)) == 0
    return Spec(in_width, lead, tuple(out), layout, draw(st.booleans()), specials)


def make_input(spec: Spec, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, object]:
    """A leaf tensor and a function giving the model's input from it (a view per ``layout``)."""
    base, view = _make_input(spec, dtype, seed)
    if spec.specials and base.numel():
        flat = base.detach().view(-1)
        for k, value in enumerate((float("nan"), float("inf"), float("-inf"))):
            flat[(k * 7) % flat.numel()] = value
    return base, view


def _make_input(spec: Spec, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, object]:
    gen = torch.Generator().manual_seed(seed)
    shape = (*spec.lead, spec.in_width)
    if spec.layout == "transposed":
        base = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen, dtype=dtype)
        return base, lambda b: b.transpose(-1, -2)
    if spec.layout == "strided":
        base = torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=dtype)
        return base, lambda b: b[..., ::2]
    return torch.randn(shape, generator=gen, dtype=dtype), lambda b: b
