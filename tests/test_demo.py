"""The demo (trained in quick mode, in process) and the ``tritskip`` command line."""

from __future__ import annotations

import io
import runpy
import sys

import pytest
import torch
from rich.console import Console
from torch import nn

from tritskip import cli, demo
from tritskip.ops import force_backend

pytest.importorskip("sklearn")


class TinyResidual(nn.Module):
    """A model for ``tritskip inspect``: one add site and one cat site."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.proj = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(x) + x)
        return torch.cat([self.proj(h), h], dim=-1)


def tiny_factory() -> nn.Module:
    return TinyResidual()


TINY_INSTANCE = TinyResidual()
NOT_A_MODEL = 42


def needs_args(width: int) -> nn.Module:
    return nn.Linear(width, width)


def returns_text() -> str:
    return "not a model"


@pytest.fixture(scope="module")
def quick_demo():
    # Module-scoped, so it runs before the per-test backend fixture: choose the PyTorch path
    # here, or CPU tensors would go through the (slow) Triton interpreter.
    # One thread: these matmuls are tiny, and a busy CI machine makes spinning threads costly.
    out = io.StringIO()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with force_backend("torch"):
            results = demo.run_demo(quick=True, seed=0, console=Console(file=out, width=120))
    finally:
        torch.set_num_threads(threads)
    return results, out.getvalue()


def test_demo_trains_both_models_to_the_same_curve(quick_demo):
    results, _ = quick_demo
    assert [r.name for r in results] == ["policy MLP", "dense MLP"]
    for r in results:
        assert len(r.eager.losses) == len(r.optimized.losses) == demo.QUICK_EPOCHS
        assert r.eager.losses[-1] < 0.5 * r.eager.losses[0], f"{r.name} did not learn"
        assert r.max_loss_gap <= demo.LOSS_RTOL, f"{r.name}: curves differ by {r.max_loss_gap}"
        assert r.eager.accuracy >= demo.MIN_ACCURACY, f"{r.name}: eager {r.eager.accuracy}"
        assert r.optimized.accuracy >= demo.MIN_ACCURACY, f"{r.name}: opt {r.optimized.accuracy}"
        assert r.failures == []


def test_demo_report_lists_fused_sites(quick_demo):
    results, text = quick_demo
    policy, dense = results
    policy_fused = {site.module: site.pattern for site in policy.report.fused}
    assert {"skip1", "skip2"} <= policy_fused.keys(), policy.report
    assert "add" in policy_fused["skip1"] and "add" in policy_fused["skip2"]
    dense_fused = {site.module: site.pattern for site in dense.report.fused}
    assert {"layers.0", "layers.1", "layers.2"} <= dense_fused.keys(), dense.report
    assert all("cat" in dense_fused[f"layers.{i}"] for i in range(3))
    for header in ("training loss per epoch", "eager vs optimized", "ms/epoch"):
        assert header in text


def test_demo_failures_name_the_check():
    good = demo.Run(losses=[1.0, 0.5], epoch_seconds=[0.1, 0.1], accuracy=0.95)
    drifted = demo.Run(losses=[1.0, 0.51], epoch_seconds=[0.1, 0.1], accuracy=0.85)
    result = demo.DemoResult("net", report="", eager=good, optimized=drifted)
    assert result.max_loss_gap == pytest.approx(0.02)
    assert result.failures == [
        "net: loss curves differ by 2.00e-02 (> 0.0001)",
        "net (optimized): test accuracy 0.850 < 0.9",
    ]


def test_demo_command_exit_code(monkeypatch, capsys):
    good = demo.Run(losses=[1.0], epoch_seconds=[0.1], accuracy=0.95)
    bad = demo.Run(losses=[2.0], epoch_seconds=[0.1], accuracy=0.95)
    calls = []

    def fake_run_demo(**kwargs):
        calls.append(kwargs)
        return [demo.DemoResult("net", "", good, bad if kwargs["seed"] == 1 else good)]

    monkeypatch.setattr(demo, "run_demo", fake_run_demo)
    assert cli.main(["demo", "--quick", "--epochs", "3"]) == 0
    assert calls[-1] == {
        "epochs": 3, "seed": 0, "quick": True, "device": "cpu", "console": calls[-1]["console"]
    }  # fmt: skip
    assert cli.main(["demo", "--seed", "1"]) == 1
    assert "loss curves differ" in capsys.readouterr().out


@pytest.mark.parametrize("attr", ["TinyResidual", "tiny_factory", "TINY_INSTANCE"])
def test_inspect_prints_the_report(attr, capsys):
    assert cli.main(["inspect", f"{__name__}:{attr}"]) == 0
    out = capsys.readouterr().out
    assert "fc" in out and "proj" in out
    assert "add" in out and "cat" in out


def test_inspect_with_example_shape(capsys):
    assert cli.main(["inspect", f"{__name__}:TinyResidual", "--shape", "3,8"]) == 0
    assert "fc" in capsys.readouterr().out


@pytest.mark.parametrize(
    "spec,message",
    [
        ("no_colon_here", "expected 'package.module:attribute'"),
        ("tritskip_no_such_module:Net", "cannot import 'tritskip_no_such_module'"),
        (f"{__name__}:Missing", f"'{__name__}' has no attribute 'Missing'"),
        (f"{__name__}:TinyResidual.nested", "has no attribute 'nested'"),
        (f"{__name__}:NOT_A_MODEL", "is a int, not an nn.Module"),
        (f"{__name__}:needs_args", "cannot call"),
        (f"{__name__}:returns_text", "returned a str, not an nn.Module"),
    ],
)
def test_inspect_bad_spec(spec, message, capsys):
    assert cli.main(["inspect", spec]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tritskip inspect: error: ") and message in err, err


def test_load_model_builds_from_a_class():
    model = cli.load_model(f"{__name__}:TinyResidual")
    assert isinstance(model, TinyResidual)
    assert cli.load_model(f"{__name__}:TINY_INSTANCE") is TINY_INSTANCE


def test_python_dash_m_runs_the_cli(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["tritskip", "inspect", "tritskip_no_such_module:Net"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("tritskip", run_name="__main__")
    assert exc.value.code == 2
    assert "cannot import 'tritskip_no_such_module'" in capsys.readouterr().err


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--epochs", "0"])
    assert exc.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
