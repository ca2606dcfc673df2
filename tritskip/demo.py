"""A skip-connection MLP from a Flux.jl forum thread, rebuilt in PyTorch and trained twice.

The thread's policy network is::

    Chain(Dense(224, 128, relu),
          SkipConnection(Dense(128, 128, relu), +),
          Dense(128, 32, relu),
          SkipConnection(Dense(32, 32), +),
          Dense(32, 4))

:class:`PolicyMLP` is that network written as a plain ``nn.Module``, the way a user writes it
(``h + relu(fc(h))``), with the input and output widths set by the data: scikit-learn's
handwritten digits (1,797 8x8 images that ship with the package, so nothing is downloaded).
:class:`DenseMLP` is a DenseNet-style variant whose layers concatenate their output to their
input. Each is trained once as written and once after :func:`tritskip.graph_pass.optimize`,
from the same initial weights and with the same batch order, and the two loss curves are
compared epoch by epoch.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LOSS_RTOL", "MIN_ACCURACY", "DemoResult", "DenseMLP", "PolicyMLP", "run_demo"]

# Both runs compute in fp32 with the same operations, but the fused backward may sum its matmuls
# in another order than autograd's: a few ulps (~1e-7 relative) per step, which training
# carries forward. Measured on CPU over the default schedule, seeds 0-4: the policy MLP's
# curves are bitwise equal; the dense MLP's (whose chain accumulates its input gradient in one
# buffer) differ by at most 2.2e-6, the gap growing as the loss falls towards 1e-3. A wrong
# gradient or a missed epilogue step moves the loss by 1e-2 or more within the first epoch, so
# 1e-4 leaves a margin of 40x below and 100x above.
LOSS_RTOL = 1e-4
MIN_ACCURACY = 0.9

# Adam at 3e-3 passes 0.95 test accuracy within 4 epochs for seeds 0-4 (0.93-0.97 after 2).
EPOCHS = 15
QUICK_EPOCHS = 4
BATCH_SIZE = 64
LEARNING_RATE = 3e-3


class PolicyMLP(nn.Module):
    """The forum thread's policy MLP, with identity skips around a 128- and a 32-wide layer."""

    def __init__(self, in_features: int = 64, num_classes: int = 10) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, 128)
        self.skip1 = nn.Linear(128, 128)
        self.fc2 = nn.Linear(128, 32)
        self.skip2 = nn.Linear(32, 32)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        h = h + torch.relu(self.skip1(h))  # SkipConnection(Dense(128, 128, relu), +)
        h = torch.relu(self.fc2(h))
        h = h + self.skip2(h)  # SkipConnection(Dense(32, 32), +)
        return self.head(h)


class DenseMLP(nn.Module):
    """DenseNet-style MLP: each layer appends ``relu(fc(h))`` to the features it was given."""

    def __init__(
        self, in_features: int = 64, num_classes: int = 10, width: int = 64, growth: int = 32,
        depth: int = 3,
    ) -> None:  # fmt: skip
        super().__init__()
        self.stem = nn.Linear(in_features, width)
        self.layers = nn.ModuleList(nn.Linear(width + i * growth, growth) for i in range(depth))
        self.head = nn.Linear(width + depth * growth, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        for fc in self.layers:
            h = torch.cat([torch.relu(fc(h)), h], dim=-1)
        return self.head(h)


MODELS: dict[str, Callable[[], nn.Module]] = {"policy MLP": PolicyMLP, "dense MLP": DenseMLP}


@dataclass
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(seed: int = 0, device: str | torch.device = "cpu") -> Digits:
    """The digits data set, 75/25 stratified split, features standardized on the training part."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.25, random_state=seed, stratify=y
    )
    scaler = StandardScaler().fit(x_train)

    def features(a):
        return torch.tensor(scaler.transform(a), dtype=torch.float32, device=device)

    def labels(a):
        return torch.tensor(a, device=device)

    return Digits(features(x_train), labels(y_train), features(x_test), labels(y_test))


@dataclass
class Run:
    """One training run: mean training loss and wall time of each epoch, final test accuracy."""

    losses: list[float] = field(default_factory=list)
    epoch_seconds: list[float] = field(default_factory=list)
    accuracy: float = 0.0

    @property
    def seconds_per_epoch(self) -> float:
        return statistics.median(self.epoch_seconds)


class Trainer:
    """Adam on cross-entropy, one epoch per call; the batch order is drawn from ``seed`` alone."""

    def __init__(self, model: nn.Module, data: Digits, seed: int) -> None:
        self.model, self.data = model, data
        self.order = torch.Generator().manual_seed(seed)  # on CPU: same order on any device
        self.opt = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        self.run = Run()

    def epoch(self) -> None:
        x, y = self.data.x_train, self.data.y_train
        self.model.train()
        start = time.perf_counter()
        total = 0.0
        for idx in torch.randperm(len(y), generator=self.order).to(x.device).split(BATCH_SIZE):
            loss = F.cross_entropy(self.model(x[idx]), y[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            total += loss.item() * len(idx)
        self.run.epoch_seconds.append(time.perf_counter() - start)
        self.run.losses.append(total / len(y))

    def evaluate(self) -> Run:
        self.model.eval()
        with torch.no_grad():
            predicted = self.model(self.data.x_test).argmax(-1)
        self.run.accuracy = (predicted == self.data.y_test).float().mean().item()
        return self.run


@dataclass
class DemoResult:
    """One model's two runs and the report of what :func:`optimize` fused in it."""

    name: str
    report: Any
    eager: Run
    optimized: Run

    @property
    def loss_gaps(self) -> list[float]:
        """Relative difference of the two loss curves, epoch by epoch."""
        return [
            abs(a - b) / max(abs(a), 1e-12)
            for a, b in zip(self.eager.losses, self.optimized.losses, strict=True)
        ]

    @property
    def max_loss_gap(self) -> float:
        return max(self.loss_gaps)

    @property
    def failures(self) -> list[str]:
        out = []
        if self.max_loss_gap > LOSS_RTOL:
            out.append(
                f"{self.name}: loss curves differ by {self.max_loss_gap:.2e} (> {LOSS_RTOL:g})"
            )
        for label, run in (("eager", self.eager), ("optimized", self.optimized)):
            if run.accuracy < MIN_ACCURACY:
                out.append(
                    f"{self.name} ({label}): test accuracy {run.accuracy:.3f} < {MIN_ACCURACY}"
                )
        return out


def run_demo(
    epochs: int | None = None, seed: int = 0, quick: bool = False, device: str = "cpu",
    console=None,
) -> list[DemoResult]:  # fmt: skip
    """Train each demo model eager and optimized; print the comparison; return the results."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from .graph_pass import optimize

    console = console or Console()
    epochs = epochs or (QUICK_EPOCHS if quick else EPOCHS)
    data = load_digits_split(seed, device)
    console.print(
        f"digits: {len(data.y_train)} training and {len(data.y_test)} test images, "
        f"{data.x_train.shape[1]} features, 10 classes; {epochs} epochs, batch {BATCH_SIZE}, "
        f"Adam lr {LEARNING_RATE:g}, seed {seed}, {device}"
    )
    example = (data.x_train[:BATCH_SIZE],)
    results = []
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        console=console, transient=True,
    )  # fmt: skip
    with progress:
        for name, build in MODELS.items():
            torch.manual_seed(seed)
            initial = build().to(device)
            # optimize() shares the Parameters of its input, so the eager run trains a copy.
            fused, report = optimize(initial, example, return_report=True)
            eager = Trainer(copy.deepcopy(initial), data, seed)
            optimized = Trainer(fused, data, seed)
            # Epochs alternate between the two so that machine noise falls on both alike.
            task = progress.add_task(name, total=epochs)
            for _ in range(epochs):
                eager.epoch()
                optimized.epoch()
                progress.advance(task)
            progress.remove_task(task)
            runs = {"eager": eager.evaluate(), "optimized": optimized.evaluate()}
            results.append(DemoResult(name, report, runs["eager"], runs["optimized"]))
    for result in results:
        _print_result(console, result)
    _print_summary(console, results)
    return results


def _print_result(console, result: DemoResult) -> None:
    from rich.table import Table

    console.rule(result.name)
    console.print(str(result.report), highlight=False, soft_wrap=True)
    table = Table(title=f"{result.name}: training loss per epoch")
    for column in ("epoch", "eager", "optimized", "relative gap"):
        table.add_column(column, justify="right")
    for i, (a, b, gap) in enumerate(
        zip(result.eager.losses, result.optimized.losses, result.loss_gaps, strict=True), 1
    ):
        table.add_row(str(i), f"{a:.6f}", f"{b:.6f}", f"{gap:.1e}")
    console.print(table)


def _print_summary(console, results: list[DemoResult]) -> None:
    from rich.table import Table

    table = Table(title="eager vs optimized")
    columns = ("model", "acc eager", "acc opt.", "max gap", "ms/epoch eager", "ms/epoch opt.",
               "speedup")  # fmt: skip
    table.add_column(columns[0], no_wrap=True)
    for column in columns[1:]:
        table.add_column(column, justify="right")
    for r in results:
        e, o = r.eager, r.optimized
        table.add_row(
            r.name, f"{e.accuracy:.3f}", f"{o.accuracy:.3f}", f"{r.max_loss_gap:.1e}",
            f"{1e3 * e.seconds_per_epoch:.1f}", f"{1e3 * o.seconds_per_epoch:.1f}",
            f"{e.seconds_per_epoch / o.seconds_per_epoch:.2f}x",
        )  # fmt: skip
    console.print(table)
    console.print(
        f"curves must agree within {LOSS_RTOL:g} relative; test accuracy must reach "
        f"{MIN_ACCURACY}; time is the median epoch"
    )
