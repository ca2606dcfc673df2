"""Models from the transformers library, tiny and randomly initialized (nothing downloaded).

One encoder (BERT), one decoder (GPT-2, whose ``Conv1D`` stores its weight as ``[in, out]``
and calls ``addmm``) and one vision model (ViT). ``torch.fx`` traces none of them whole, so each
runs through ``torch.compile(model, backend="tritskip")``: in eval mode every site must be
reported and fused as listed here and the output must match the original in float64; in
training, a step under the same seed must give every parameter the original's gradient (the
dropout sites then run as written, and draw the same masks).
"""

from __future__ import annotations

import copy
from importlib.metadata import entry_points

import pytest
import torch

import tritskip.graph_pass as graph_pass
from tritskip import cli
from tritskip.graph_pass import dynamo_backend, explain

transformers = pytest.importorskip("transformers")

TOL = {"rtol": 1e-10, "atol": 1e-10}
VOCAB = 99


def tiny_bert(layers: int = 2):
    config = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=37,
        vocab_size=VOCAB,
    )  # fmt: skip
    return transformers.BertModel(config)


def tiny_gpt2(layers: int = 2):
    config = transformers.GPT2Config(
        n_embd=32, n_layer=layers, n_head=2, vocab_size=VOCAB, n_positions=32,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    return transformers.GPT2Model(config)


def tiny_vit(layers: int = 2):
    config = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=37,
        image_size=16, patch_size=4, num_channels=3,
    )  # fmt: skip
    return transformers.ViTModel(config)


def token_inputs() -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    }


def image_inputs() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen, dtype=torch.float64)}


def gpt2_one_layer():
    return tiny_gpt2(1)


def _per_layer(layers: int, sites: list[tuple[str, str]], tail=()) -> list[tuple[str, str]]:
    return [(name.format(i), pattern) for i in range(layers) for name, pattern in sites] + list(
        tail
    )


# model -> (factory, inputs, [(module, pattern)] of the sites fused in eval mode, in order)
MODELS = {
    "bert": (
        tiny_bert,
        token_inputs,
        _per_layer(
            2,
            [
                ("encoder.layer.{}.attention.output.dense", "F.linear → dropout → add"),
                ("encoder.layer.{}.intermediate.dense", "F.linear → gelu"),
                ("encoder.layer.{}.output.dense", "F.linear → dropout → add"),
            ],
            [("pooler.dense", "F.linear → tanh")],
        ),
    ),
    "gpt2": (
        tiny_gpt2,
        token_inputs,
        _per_layer(
            2,
            [
                ("h.{}.attn.c_proj", "addmm → dropout → add"),
                ("h.{}.mlp.c_fc", "addmm → gelu_tanh"),
                ("h.{}.mlp.c_proj", "addmm → dropout → add"),
            ],
        ),
    ),
    "vit": (
        tiny_vit,
        image_inputs,
        _per_layer(
            2,
            [
                ("layers.{}.attention.o_proj", "F.linear → dropout → add"),
                ("layers.{}.mlp.fc1", "F.linear → gelu"),
                ("layers.{}.mlp.fc2", "F.linear → dropout → add"),
            ],
            [("pooler.dense", "F.linear → tanh")],
        ),
    ),
}


@pytest.fixture
def recorded_sites(monkeypatch):
    """The sites of every graph the backend is handed, one list per graph."""
    graphs = []

    def recording(gm, **kwargs):
        sites = fuse_graph(gm, **kwargs)
        graphs.append(sites)
        return sites

    fuse_graph = graph_pass.fuse_graph
    monkeypatch.setattr(graph_pass, "fuse_graph", recording)
    torch._dynamo.reset()
    yield graphs
    torch._dynamo.reset()


def outputs(out) -> list[torch.Tensor]:
    return [t for t in out.values() if isinstance(t, torch.Tensor)]


def test_backend_registered_by_name():
    (entry,) = [e for e in entry_points(group="torch_dynamo_backends") if e.name == "tritskip"]
    assert entry.load() is dynamo_backend, entry
    assert torch._dynamo.lookup_backend("tritskip") is dynamo_backend


@pytest.mark.parametrize("name", MODELS)
def test_real_model(name, recorded_sites):
    factory, make_inputs, expected = MODELS[name]
    torch.manual_seed(0)
    model = factory().double()
    compiled = copy.deepcopy(model)
    compiled.compile(backend="tritskip")
    inputs = make_inputs()

    model.eval()
    compiled.eval()
    with torch.no_grad():
        want, got = outputs(model(**inputs)), outputs(compiled(**inputs))
    for k, (a, b) in enumerate(zip(want, got, strict=True)):
        torch.testing.assert_close(b, a, **TOL, msg=f"{name}: output {k} differs in eval mode")
    sites = [s for graph in recorded_sites for s in graph]
    assert [(s.module, s.pattern) for s in sites if s.fused] == expected, sites
    assert all(s.fused for s in sites), [s for s in sites if not s.fused]

    model.train()
    compiled.train()
    recorded_sites.clear()
    grads = []
    for m in (model, compiled):
        m.zero_grad()
        torch.manual_seed(1)
        out = outputs(m(**inputs))[0]
        weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
        (out * weights).sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys(), "different parameters received gradients"
    for key, g in grads[0].items():
        torch.testing.assert_close(grads[1][key], g, **TOL, msg=f"{name}: gradient of {key}")
    train_sites = [s for graph in recorded_sites for s in graph]
    with_dropout = [s for s in train_sites if "dropout" in s.pattern]
    rate = {"bert": 0.1, "gpt2": 0.1, "vit": 0.0}[name]
    # ViT's dropout rate is 0, which Dynamo records as the identity in training too.
    assert all(s.fused == (rate == 0) for s in with_dropout), train_sites
    assert len(train_sites) == len(expected), train_sites


def test_fx_front_end_reports_what_it_can_trace():
    report = explain(tiny_bert())
    assert report.untraced, "BERT traced whole with torch.fx; the Dynamo path is not needed"
    fused = {(s.module, s.fused) for s in report}
    assert ("encoder.layer.0.output.dense", True) in fused, str(report)


def test_inspect_with_dynamo(capsys):
    args = ["inspect", f"{__name__}:gpt2_one_layer", "--dynamo", "--inputs"]
    assert cli.main([*args, f"{__name__}:token_inputs"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("3 sites, 3 fused, 0 left"), out
    assert "h.0.mlp.c_fc" in out and "addmm → gelu_tanh" in out, out


def test_inspect_without_dynamo_points_to_it(capsys):
    assert cli.main(["inspect", f"{__name__}:gpt2_one_layer"]) == 0
    out = capsys.readouterr().out
    assert "not traced whole" in out and "--dynamo" in out, out


def test_inspect_dynamo_needs_inputs(capsys):
    assert cli.main(["inspect", f"{__name__}:gpt2_one_layer", "--dynamo"]) == 2
    assert "--dynamo needs --shape or --inputs" in capsys.readouterr().err
