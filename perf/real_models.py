"""Coverage on models from the transformers library: which sites each front end finds and fuses.

Builds tiny BERT, GPT-2 and ViT models with random weights (nothing is downloaded), reports for
each the Linear layers, the sites ``optimize`` (torch.fx) and ``torch.compile(backend=
"tritskip")`` (Dynamo, eval mode) find, fuse and leave with their reasons, and the largest
difference from the original in eval mode (float32 and float64) and in one training step's
gradients (float64, same seed). On CPU the fused calls run the in-place composition, so those
differences are rounding at most; the last column runs the fused calls on the Triton kernels
(the interpreter) in float32 and gives their error against the float64 model next to eager
float32's. Prints a markdown table.

    python perf/real_models.py
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported

import copy
from collections import Counter

import torch
import transformers

from tritskip.graph_pass import _transposed_linear, explain
from tritskip.ops import force_backend


def models():
    bert = transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        vocab_size=99,
    )  # fmt: skip
    gpt2 = transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=99, n_positions=32, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    vit = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        image_size=16, patch_size=4, num_channels=3,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    ids = {"input_ids": torch.randint(0, 99, (2, 7), generator=gen)}
    pixels = {"pixel_values": torch.randn(2, 3, 16, 16, generator=gen)}
    yield "BERT (encoder)", transformers.BertModel(bert), ids
    yield "GPT-2 (decoder)", transformers.GPT2Model(gpt2), ids
    yield "ViT (vision)", transformers.ViTModel(vit), pixels


def _inputs(inputs, dtype):
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def _first(out) -> torch.Tensor:
    return next(v for v in out.values() if isinstance(v, torch.Tensor))


def _eval_error(model, inputs, dtype) -> float:
    model = copy.deepcopy(model).to(dtype).eval()
    compiled = copy.deepcopy(model)
    compiled.compile(backend="tritskip")
    with torch.no_grad(), force_backend("composite"):  # what CPU users get
        want, got = (
            _first(model(**_inputs(inputs, dtype))),
            _first(compiled(**_inputs(inputs, dtype))),
        )
    torch._dynamo.reset()
    return (got - want).abs().max().item()


def _kernel_error(model, inputs) -> str:
    """Fused (Triton kernels) and eager float32 errors against the float64 model, in eval."""
    oracle = copy.deepcopy(model).double().eval()
    eager = copy.deepcopy(model).float().eval()
    compiled = copy.deepcopy(eager)
    compiled.compile(backend="tritskip")
    with torch.no_grad(), force_backend("triton"):
        want = _first(oracle(**_inputs(inputs, torch.float64)))
        e = _first(eager(**_inputs(inputs, torch.float32)))
        f = _first(compiled(**_inputs(inputs, torch.float32)))
    torch._dynamo.reset()
    err = (f.double() - want).abs().max().item()
    return f"{err:.1e} (eager {(e.double() - want).abs().max().item():.1e})"


def _grad_error(model, inputs) -> float:
    model = copy.deepcopy(model).double().train()
    compiled = copy.deepcopy(model)
    compiled.compile(backend="tritskip")
    grads = []
    for m in (model, compiled):
        torch.manual_seed(1)
        with force_backend("composite"):
            out = _first(m(**_inputs(inputs, torch.float64)))
        out.square().mean().backward()
        grads.append([p.grad for p in m.parameters()])
    torch._dynamo.reset()
    return max((a - b).abs().max().item() for a, b in zip(*grads, strict=True) if a is not None)


def _reasons(sites) -> str:
    counts = Counter(f"{s.pattern}: {s.reason}" for s in sites if not s.fused)
    return "; ".join(f"{n}× {text}" for text, n in counts.items()) or "none"


def main() -> None:
    rows = []
    for name, model, inputs in models():
        linears = sum(
            isinstance(m, torch.nn.Linear) or _transposed_linear(m) for m in model.modules()
        )
        fx = explain(model)
        dynamo = explain(model.eval(), inputs, dynamo=True)
        rows.append(
            (
                name,
                str(linears),
                f"{len(fx)} / {len(fx.fused)} / {len(fx.left)}",
                f"{len(dynamo)} / {len(dynamo.fused)} / {len(dynamo.left)}",
                _reasons(dynamo.sites),
                f"{_eval_error(model, inputs, torch.float32):.1e}",
                f"{_eval_error(model, inputs, torch.float64):.1e}",
                f"{_grad_error(model, inputs):.1e}",
                _kernel_error(model, inputs),
            )
        )
    header = (
        "model", "Linears", "fx: sites / fused / left", "Dynamo: sites / fused / left",
        "left (Dynamo), reasons", "max err eval fp32", "max err eval fp64",
        "max grad err train fp64", "fp32 err vs fp64, Triton kernels",
    )  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
