"""The benchmark suite end to end on a tiny CPU plan: it runs, checks, and writes its report.

Times are not asserted (speed lives in perf/); only that every cell was measured or says why
not, that ratios are formed, and that the files are written.
"""

import json

import pytest
import torch

from tritskip import bench
from tritskip.benchmarks import WORKLOADS, make_plan, run
from tritskip.benchmarks.report import write_results
from tritskip.benchmarks.workloads import flops, min_bytes


def test_bench_command_writes_results(tmp_path, capsys):
    code = bench.main([
        "--quick", "--workloads", "op_add,op_cat,residual_mlp8,dense_chain16", "--widths", "16",
        "--rows", "8", "--no-compile", "--scaling-depths", "2,4", "--no-plot", "--no-progress",
        "--out", str(tmp_path),
    ])  # fmt: skip
    assert code == 0
    (folder,) = tmp_path.iterdir()
    assert "-cpu-" in folder.name
    data = json.loads((folder / "results.json").read_text())
    cells = data["measurements"]
    assert {(c["workload"], c["mode"], c["variant"]) for c in cells} == {
        (w, m, v)
        for w in ("op_add", "op_cat", "residual_mlp8", "dense_chain16")
        for m in ("forward", "forward+backward")
        for v in ("tritskip", "eager", "addmm")
    }
    assert all(c["status"] == "ok" and c["time_ms"]["median"] > 0 for c in cells)
    assert all(c["peak_mb"] is not None for c in cells)
    assert all(check["ok"] for check in data["checks"])
    assert len(data["ratios"]) == 4 * 2 * 2
    assert data["optimize_scaling"]["rows"]
    assert "## Speed-up of tritskip" in (folder / "results.md").read_text()
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("speed-up of tritskip")  # the short table comes last


def test_compile_anchor_is_recorded_when_unavailable(monkeypatch):
    from tritskip.benchmarks import runner

    monkeypatch.setattr(runner, "compile_unavailable", lambda device: "no compiler here")
    plan = make_plan("cpu", quick=True, workloads=["op_add"], widths=[8], rows=4,
                     anchors=["eager", "compile"], scaling_depths=())  # fmt: skip
    result = run(plan, progress=False)
    compiled = [m for m in result.measurements if m.variant == "compile"]
    assert compiled and all(m.status == "skipped" for m in compiled)
    assert all("no compiler here" in m.reason for m in compiled)
    assert {r["anchor"] for r in result.ratios()} == {"eager"}


def test_failed_check_stops_before_timing(monkeypatch):
    from tritskip.benchmarks import runner

    def wrong(model, x):  # a "fused" op that is off by one
        return torch.relu(model.fc(x) + x) + 1

    monkeypatch.setitem(WORKLOADS, "op_add",
                        runner.Workload(**{**WORKLOADS["op_add"].__dict__, "fused_forward": wrong}))  # fmt: skip
    plan = make_plan("cpu", quick=True, workloads=["op_add"], widths=[8], rows=4,
                     anchors=["eager"], scaling_depths=())  # fmt: skip
    with pytest.raises(runner.CheckFailed, match="output"):
        run(plan, progress=False)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_cost_model_counts_every_linear(name):
    workload = WORKLOADS[name]
    model = workload.build(32)
    specs = workload.specs(32)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(s.k, s.n) for s in specs] == [(m.in_features, m.out_features) for m in linears]
    assert flops(specs, 4, backward=True) == 3 * flops(specs, 4, backward=False)
    assert min_bytes(specs, 4, 2, backward=True) > min_bytes(specs, 4, 2, backward=False) > 0


def test_results_folder_is_named_by_date_and_device(tmp_path):
    plan = make_plan("cpu", quick=True, workloads=["op_add"], widths=[8], rows=4,
                     anchors=["eager"], scaling_depths=())  # fmt: skip
    result = run(plan, progress=False)
    paths = write_results(result, tmp_path, make_plot=False)
    assert paths["json"].parent.name == f"{result.meta['date']}-{result.meta['device_name']}"


def test_prewarm_workers_split_the_configs_and_launch_nothing():
    from types import SimpleNamespace

    from tritskip.benchmarks.prewarm import _build_only

    built = []
    configs = [SimpleNamespace(all_kwargs=lambda i=i: {"BLOCK": i}) for i in range(5)]
    tuner = SimpleNamespace(
        arg_names=["x", "n"], configs=configs, nargs=None,
        prune_configs=lambda kwargs: configs[1:],  # the first config is pruned for this shape
        fn=SimpleNamespace(warmup=lambda *a, **kw: built.append((a, kw))),
    )  # fmt: skip
    for index in range(2):
        _build_only(index, 2)(tuner, "X", 7, grid=(1,), warmup=False)
    assert sorted(kw["BLOCK"] for _, kw in built) == [1, 2, 3, 4]
    assert all(a == ("X", 7) and "warmup" not in kw and kw["grid"] == (1,) for a, kw in built)
    assert tuner.nargs is None


def test_cuda_plan_is_bf16_budgeted_and_puts_the_chain_last(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(L2_cache_size=60 * 2**20))  # fmt: skip
    plan = make_plan("cuda")
    assert plan.dtype == torch.bfloat16 and plan.prewarm and plan.l2_bytes == 60 * 2**20
    assert plan.anchors == ["eager", "addmm", "compile", "max-autotune"]
    assert plan.budget_s is not None and plan.budget_s <= 270
    cases = [w.name for w, _ in plan.cases()]
    assert set(cases) == set(WORKLOADS) and cases[-1] == "dense_chain16"
    assert len(cases) <= 12
