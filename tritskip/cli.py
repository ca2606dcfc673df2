"""The ``tritskip`` command line.

Each subcommand is one ``add_parser`` call in a small ``_add_*`` function listed in
:data:`SUBCOMMANDS`, which sets ``run`` to the function that executes it. The work itself
lives in other modules, imported only when the subcommand runs, so the command line needs
none of the optional dependencies (scikit-learn for ``demo``) until a subcommand uses them.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["SpecError", "load_inputs", "load_model", "main"]


class SpecError(Exception):
    """A ``module:attribute`` spec that does not lead to a model."""


def load_model(spec: str) -> nn.Module:
    """Import ``package.module:attr`` and return the model it names.

    ``attr`` (dotted for nested attributes) may be an ``nn.Module`` instance, or a class or
    factory function that builds one when called with no arguments.
    """
    obj = _load(spec)
    if isinstance(obj, nn.Module):
        return obj
    if not callable(obj):
        raise SpecError(
            f"{spec!r} is a {type(obj).__name__}, not an nn.Module, a class or a factory"
        )
    model = _call(obj, spec)
    if not isinstance(model, nn.Module):
        raise SpecError(f"{spec}() returned a {type(model).__name__}, not an nn.Module")
    return model


def load_inputs(spec: str) -> Any:
    """Import ``package.module:attr`` naming example inputs: a tensor, a tuple of positional
    arguments or a dict of keyword arguments, or a function called with no arguments that
    returns one."""
    obj = _load(spec)
    if callable(obj) and not isinstance(obj, torch.Tensor):
        obj = _call(obj, spec)
    if not isinstance(obj, (torch.Tensor, tuple, list, dict)):
        raise SpecError(
            f"{spec!r} gives a {type(obj).__name__}, not a tensor, a tuple or a dict of inputs"
        )
    return obj


def _load(spec: str) -> Any:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SpecError(f"expected 'package.module:attribute', got {spec!r}")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise SpecError(f"cannot import {module_name!r}: {e}") from e
    for i, part in enumerate(attr.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            where = ".".join([module_name, *attr.split(".")[:i]])
            raise SpecError(f"{where!r} has no attribute {part!r}") from None
    return obj


def _call(obj: Callable[[], Any], spec: str) -> Any:
    try:
        inspect.signature(obj).bind()
    except TypeError as e:
        raise SpecError(
            f"cannot call {spec!r} with no arguments ({e}); point at a model instance or at a "
            "factory that needs none"
        ) from None
    except ValueError:  # no signature to check (some builtins): let the call decide
        pass
    return obj()


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        dims = ()
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(
            f"expected positive ints separated by commas, got {text!r}"
        )
    return dims


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _run_demo(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .demo import run_demo

    console = Console()
    results = run_demo(
        epochs=args.epochs, seed=args.seed, quick=args.quick, device=args.device, console=console
    )
    failures = [f for r in results for f in r.failures]
    for failure in failures:
        console.print(f"[bold red]FAILED[/] {failure}")
    return 1 if failures else 0


def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="train a skip-connection MLP eager and optimized, compare the loss curves",
        description="Rebuild the policy MLP of a Flux.jl forum thread (and a DenseNet-style "
        "variant), train each on scikit-learn's digits eager and after tritskip's optimize(), "
        "and compare loss curves, accuracy and time per epoch. Exits non-zero when the curves "
        "disagree or an accuracy stays below 0.9.",
    )
    p.add_argument("--epochs", type=_positive, default=None, help="epochs (default 15, quick 4)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights, split and batch order")
    p.add_argument("--quick", action="store_true", help="fewer epochs, for a smoke test")
    p.add_argument("--device", default="cpu", help="device to train on, e.g. cpu or cuda")
    p.set_defaults(run=_run_demo)


def _run_inspect(args: argparse.Namespace) -> int:
    from .graph_pass import explain

    # A console script does not put the working directory on sys.path; `python -m` does. It is
    # added only while the user's module loads, and last, so a folder there cannot shadow an
    # installed package imported then or later (a checkout's kernels/ and the PyPI package
    # transformers imports while it builds a model).
    added = os.getcwd() not in sys.path
    if added:
        sys.path.append(os.getcwd())
    try:
        model = load_model(args.spec)
        example = None if args.inputs is None else load_inputs(args.inputs)
    except SpecError as e:
        print(f"tritskip inspect: error: {e}", file=sys.stderr)
        return 2
    finally:
        if added:
            sys.path.remove(os.getcwd())
    if example is None and args.shape is not None:
        example = (torch.randn(*args.shape),)
    if args.dynamo and example is None:
        print("tritskip inspect: error: --dynamo needs --shape or --inputs", file=sys.stderr)
        return 2
    if args.dynamo:
        model.eval()
    try:
        report = explain(model, example, dynamo=args.dynamo)
    except ValueError as e:
        print(f"tritskip inspect: error: {e}", file=sys.stderr)
        return 2
    print(report)
    if report.untraced and not args.dynamo:
        print(
            "\nSome modules do not trace with torch.fx; --dynamo (with --shape or --inputs) "
            'reports what torch.compile(model, backend="tritskip") fuses in them.'
        )
    return 0


def _add_inspect(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="list the skip patterns optimize() would fuse in a model",
        description="Import a model (an nn.Module, or a class or factory called with no "
        "arguments) and print tritskip's report of the sites optimize() would fuse or leave.",
    )
    p.add_argument("spec", help="package.module:attribute, e.g. torchvision.models:resnet18")
    p.add_argument(
        "--shape", type=_shape, default=None,
        help="example input shape, e.g. 8,64: checks shapes with a random input",
    )  # fmt: skip
    p.add_argument(
        "--inputs", default=None, metavar="SPEC",
        help="package.module:attr naming example inputs (a tensor, a tuple, a dict of keyword "
        "arguments, or a function returning one), e.g. for a model taking token ids",
    )  # fmt: skip
    p.add_argument(
        "--dynamo", action="store_true",
        help="capture the model with TorchDynamo (as torch.compile with backend='tritskip' "
        "does) instead of torch.fx; reaches models fx cannot trace; runs in eval mode",
    )  # fmt: skip
    p.set_defaults(run=_run_inspect)


def _run_bench(args: argparse.Namespace) -> int:
    from .bench import run_from_args

    return run_from_args(args)


def _add_bench(sub: argparse._SubParsersAction) -> None:
    from .bench import __doc__ as description
    from .bench import add_arguments

    p = sub.add_parser(
        "bench",
        help="benchmark the fused ops and models against eager, addmm and torch.compile",
        description=description,
    )
    add_arguments(p)
    p.set_defaults(run=_run_bench)


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    _add_demo,
    _add_inspect,
    _add_bench,
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tritskip", description="Skip-connection blocks and fused Linear epilogues."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for add in SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
