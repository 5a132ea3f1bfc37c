"""The ``healthgpt`` command: argparse subcommands, each registered by its own module.

Adding a subcommand (``train``, ``demo``, ``eval``, ...): write ``healthgpt/cli/<name>.py`` with
``register(subparsers)`` that adds a parser and sets ``func=<callable(args) -> int>`` as its default,
then add one line to ``SUBCOMMANDS``. ``add_model_arguments`` / ``model_from_args`` give every
subcommand the same ``--weights`` / ``--device`` / ``--seed`` handling. Registrars are imported only
when the parser is built, so one subcommand's optional dependencies never break another.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

__all__ = ["main", "build_parser", "SUBCOMMANDS", "subcommand", "add_model_arguments", "model_from_args", "CLIError"]

SUBCOMMANDS = {
    "answer": "healthgpt.cli.infer:register_answer",
    "generate": "healthgpt.cli.infer:register_generate",
    "convert-vqgan": "healthgpt.cli.convert:register_vqgan",
    "convert-release": "healthgpt.cli.convert:register_release",
    "eval": "healthgpt.cli.eval:register",
    "train": "healthgpt.training.run:register",
    "demo": "healthgpt.training.demo:register",
    "data": "healthgpt.cli.data:register",
}
"""subcommand name -> ``"module:function"``; the function takes the argparse subparsers object."""


def subcommand(name: str, help: str, doc: str, add_arguments, run):
    """-> ``(register, main)`` for a subcommand whose module has ``add_arguments(parser)`` and
    ``run(args) -> int``: ``register`` goes into ``SUBCOMMANDS``, ``main(argv)`` runs it on its own
    (``python -m``, as torchrun needs). The module docstring's first line describes it; the rest is the epilog."""
    texts = dict(description=doc.strip().splitlines()[0], epilog=doc, formatter_class=argparse.RawDescriptionHelpFormatter)

    def register(subparsers) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=help, **texts)
        add_arguments(parser)
        parser.set_defaults(func=run)
        return parser

    def main(argv=None) -> int:
        parser = argparse.ArgumentParser(prog=f"healthgpt {name}", **texts)
        add_arguments(parser)
        return run(parser.parse_args(argv))

    return register, main


class CLIError(Exception):
    """A user-facing error: printed as ``healthgpt: error: ...`` with exit status 2."""


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", metavar="DIR", help="HealthGPT weights directory (HealthGPT.save_pretrained); "
                        "default: the tiny preset with random weights (untrained outputs)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights and sampling (default: 0)")


def model_from_args(args):
    """The model ``--weights`` names, or the tiny preset (with a warning) when it is not given."""
    import torch

    from healthgpt.model.healthgpt import HealthGPT

    if args.weights is None:
        warnings.warn("no --weights given: using the tiny preset with random weights; its outputs are untrained noise",
                      stacklevel=2)
        torch.manual_seed(args.seed)
        model = HealthGPT("tiny")
    else:
        model = HealthGPT.from_pretrained(args.weights)
    return model.to(args.device).eval()


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)


def decoding_kwargs(args) -> dict:
    return dict(do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--window", type=float, nargs=2, metavar=("CENTER", "WIDTH"),
                        help="intensity window for DICOM / NIfTI / 16-bit input (default: the file's, else min-max)")
    parser.add_argument("--frame", type=int, help="frame of a multi-frame DICOM or volume of a 4-D NIfTI")
    parser.add_argument("--axis", type=int, choices=(0, 1, 2), help="NIfTI slicing axis (default 2, axial)")
    parser.add_argument("--slice", type=int, dest="slice_index", help="NIfTI slice index (default: the middle)")


def image_from_args(path: str | None, args):
    if path is None:
        return None
    from healthgpt.data.images import load_image

    return load_image(path, window=args.window, frame=args.frame, axis=args.axis, slice_index=args.slice_index)


def build_parser(subcommands: dict | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="healthgpt", description="HealthGPT medical vision-language model")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, target in (SUBCOMMANDS if subcommands is None else subcommands).items():
        module, _, func = target.partition(":")
        getattr(importlib.import_module(module), func)(sub)
        if name not in sub.choices:
            raise RuntimeError(f"registrar {target} did not add the {name!r} subcommand")
    return parser


def main(argv: list | None = None) -> int:
    """Entry point of the ``healthgpt`` console script; returns the exit status."""
    from hlora import CheckpointError

    from healthgpt.model.vq_convert import ConversionError
    from healthgpt.data.images import ImageLoadError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CLIError, FileNotFoundError, ImageLoadError, CheckpointError, ConversionError) as e:
        print(f"healthgpt: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
