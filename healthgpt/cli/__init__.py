"""The ``healthgpt`` command: argparse subcommands, each registered by its own module.

Adding a subcommand (``train``, ``demo``, ``eval``, ...): write ``healthgpt/cli/<name>.py`` with
``add_arguments(parser)`` and ``run(args) -> int``, make ``register, main = subcommand(...)`` there,
and add one line to ``SUBCOMMANDS``. ``add_model_arguments`` / ``model_from_args`` give every
subcommand the same ``--weights`` / ``--device`` / ``--seed`` handling and the one place a model is
built from them.

Errors: a subcommand raises (``CLIError`` for usage problems, or the domain errors in
``user_errors()``: a missing file, an unreadable image, a bad training row or checkpoint); ``run_guarded``,
used by ``main`` and by every subcommand's stand-alone ``main``, prints ``healthgpt: error: ...`` and
returns 2. Nothing else prints errors or picks exit codes.

Imports: building the parser imports every registrar module, so those modules (and this one) import
the model, torch and the image stack inside their ``run`` functions, not at the top: ``healthgpt data
check`` or ``healthgpt --help`` then start without loading torch/transformers, and one subcommand's
optional dependencies never break another.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import re
import sys
import warnings

__all__ = ["main", "build_parser", "SUBCOMMANDS", "subcommand", "add_model_arguments", "model_from_args", "CLIError",
           "run_guarded", "user_errors", "TINY_WARNING",
           "device_from_args", "check_decoding_arguments"]

SUBCOMMANDS = {
    "answer": "healthgpt.cli.infer:register_answer",
    "generate": "healthgpt.cli.infer:register_generate",
    "convert-vqgan": "healthgpt.cli.convert:register_vqgan",
    "convert-release": "healthgpt.cli.convert:register_release",
    "eval": "healthgpt.cli.eval:register",
    "train": "healthgpt.cli.train:register",
    "demo": "healthgpt.training.demo:register",
    "data": "healthgpt.cli.data:register",
}
"""subcommand name -> ``"module:function"``; the function takes the argparse subparsers object."""


def subcommand(name: str, help: str, doc: str, add_arguments, run, parents: tuple = ()):
    """-> ``(register, main)`` for a subcommand whose module has ``add_arguments(parser)`` and
    ``run(args) -> int``: ``register`` goes into ``SUBCOMMANDS``, ``main(argv)`` runs it on its own
    (``python -m``, as torchrun needs). The module docstring's first line describes it; the rest is the epilog.
    ``parents``: argparse parent parsers whose options it takes too (e.g. a ``transformers.HfArgumentParser``
    of a dataclass, made with ``add_help=False``); ``add_arguments`` may then be None."""
    texts = dict(description=doc.strip().splitlines()[0], epilog=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
                 parents=list(parents))

    def register(subparsers) -> argparse.ArgumentParser:
        parser = subparsers.add_parser(name, help=help, **texts)
        if add_arguments is not None:
            add_arguments(parser)
        parser.set_defaults(func=run)
        return parser

    def main(argv=None) -> int:
        parser = argparse.ArgumentParser(prog=f"healthgpt {name}", **texts)
        if add_arguments is not None:
            add_arguments(parser)
        return run_guarded(run, parser.parse_args(argv))

    return register, main


class CLIError(Exception):
    """A user-facing error: printed as ``healthgpt: error: ...`` with exit status 2."""


def user_errors() -> tuple:
    """The exception types ``run_guarded`` reports as one line (the user's input is at fault, no
    traceback helps): ``CLIError`` and the library's input errors."""
    from hlora import CheckpointError

    from healthgpt.data.format import DataError
    from healthgpt.data.images import ImageLoadError
    from healthgpt.model.healthgpt import PromptTooLong
    from healthgpt.model.vq_convert import ConversionError

    return (CLIError, FileNotFoundError, NotADirectoryError, ImageLoadError, DataError, CheckpointError, ConversionError,
            PromptTooLong)


def run_guarded(run, args) -> int:
    """``run(args)`` -> its exit status (None counts as 0); a ``user_errors()`` exception is printed as
    ``healthgpt: error: ...`` on stderr and gives 2. The one error path of every subcommand."""
    try:
        return int(run(args) or 0)
    except user_errors() as e:
        print(f"healthgpt: error: {e}", file=sys.stderr)
        return 2


TINY_WARNING = ("no --weights given: using the tiny preset with random weights; its outputs are untrained noise "
                "and any scores meaningless (use it only to test the pipeline)")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", metavar="DIR", help="HealthGPT weights directory (HealthGPT.save_pretrained); "
                        "default: the tiny preset with random weights (untrained outputs)")
    parser.add_argument("--device", default="auto",
                        help="torch device, e.g. cpu, cuda, cuda:1 (default: auto, cuda when available)")
    parser.add_argument("--seed", type=int, default=0, help="seed for random weights and sampling (default: 0)")
    parser.add_argument("--load-in-4bit", action="store_true",
                        help="hold the LLM's linears (not lm_head) in bitsandbytes nf4 (HealthGPTConfig.load_in_4bit)")


def model_from_args(args):
    """The one place a model is built from ``add_model_arguments``' options: ``--weights`` (a folder
    written by ``HealthGPT.save_pretrained``), or the tiny preset with random weights seeded by
    ``--seed`` (with ``TINY_WARNING``); moved to ``--device`` and put in eval mode."""
    import torch

    from healthgpt.model.config import HealthGPTConfig
    from healthgpt.model.healthgpt import HealthGPT

    device = device_from_args(args)  # before the (slow) load: a bad --device fails at once
    four_bit = getattr(args, "load_in_4bit", False)  # callers may build the namespace without the flag
    if args.weights is None:
        warnings.warn(TINY_WARNING, stacklevel=2)
        torch.manual_seed(args.seed)
        model = HealthGPT(HealthGPTConfig.preset("tiny", load_in_4bit=four_bit))
    else:
        model = HealthGPT.from_pretrained(args.weights, **({"load_in_4bit": True} if four_bit else {}))
    return model.to(device).eval()


def device_from_args(args) -> str:
    """``--device`` checked before any model is loaded: ``auto`` -> cuda when available, else cpu; a
    device this machine or torch build lacks is a ``CLIError``."""
    import torch

    device = args.device
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        parsed = torch.device(device)
    except RuntimeError as e:
        raise CLIError(f"--device {device!r} is not a torch device ({e})") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise CLIError(f"--device {device}: {why}; use --device cpu (or auto)")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise CLIError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise CLIError(f"--device {device}: MPS is not available on this machine; use --device cpu (or auto)")
    return device


def add_decoding_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)


def check_decoding_arguments(args) -> None:
    """The decoding options in range, checked before anything is loaded: ``--max-new-tokens`` >= 1
    (where the command has it), ``--top-k`` >= 1, ``--top-p`` in (0, 1], ``--temperature`` finite and,
    with ``--sample``, > 0 (0 is greedy decoding: omit ``--sample``)."""
    import math

    max_new = getattr(args, "max_new_tokens", None)
    if max_new is not None and max_new < 1:
        raise CLIError(f"--max-new-tokens must be at least 1, got {max_new}")
    if args.top_k is not None and args.top_k < 1:
        raise CLIError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not (0 < args.top_p <= 1):
        raise CLIError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        raise CLIError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.sample and args.temperature == 0:
        raise CLIError("--temperature 0 with --sample: sampling needs a temperature > 0 (temperature 0 is greedy "
                       "decoding: omit --sample)")


def decoding_kwargs(args) -> dict:
    check_decoding_arguments(args)
    return dict(do_sample=args.sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--window", type=float, nargs=2, metavar=("CENTER", "WIDTH"),
                        help="intensity window for DICOM / NIfTI / 16-bit input, DICOM's linear VOI window as in "
                             "training data (healthgpt.data.images; default: the file's, else min-max)")
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


def missing_requirements(extra: str = "healthgpt") -> list:
    """The distributions ``hlora[extra]`` declares that are not installed. Cheap: reads installed
    metadata, imports nothing; ``[]`` when hlora itself is not installed (a bare source tree)."""
    try:
        requirements = importlib.metadata.requires("hlora") or []
    except importlib.metadata.PackageNotFoundError:
        return []
    missing = []
    for requirement in requirements:
        spec, _, marker = requirement.partition(";")
        if f'extra == "{extra}"' in marker:
            name = re.match(r"[A-Za-z0-9._-]+", spec.strip()).group(0)
            try:
                importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                missing.append(name)
    return missing


def main(argv: list | None = None) -> int:
    """Entry point of the ``healthgpt`` console script; returns the exit status."""
    missing = missing_requirements()
    if missing:  # `pip install hlora` alone: one line, not an ImportError traceback
        print(f"healthgpt: error: {', '.join(missing)} not installed: install hlora[healthgpt] "
              f"(pip install \"hlora[healthgpt]\")", file=sys.stderr)
        return 1
    args = build_parser().parse_args(argv)
    return run_guarded(args.func, args)


if __name__ == "__main__":
    sys.exit(main())
