"""``healthgpt answer`` and ``healthgpt generate``: one request to a model from ``--weights``."""

from __future__ import annotations

import os

from healthgpt.cli import (
    CLIError,
    add_decoding_arguments,
    add_image_arguments,
    add_model_arguments,
    check_decoding_arguments,
    decoding_kwargs,
    device_from_args,
    image_from_args,
    model_from_args,
    subcommand,
)

__all__ = ["register_answer", "register_generate", "run_answer", "run_generate"]

ANSWER_DOC = """Answer a question about an image (comprehension).

    healthgpt answer --weights WEIGHTS --image scan.dcm --question "What abnormality is shown?"
    healthgpt answer --weights WEIGHTS --image ct.nii.gz --slice 40 --window 40 400 --question "Which organ?"
"""

GENERATE_DOC = """Generate an image from an image and/or an instruction (generation).

    healthgpt generate --weights WEIGHTS --image ct.png --instruction "Convert this CT slice to MRI." --out mri.png
"""


def add_compile_argument(p) -> None:
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (faster steps after a one-off compilation of "
                        "seconds to minutes: pays off for long answers and images)")


def add_answer_arguments(p) -> None:
    p.add_argument("--image", help="PNG/JPEG, DICOM or NIfTI file (omit for a text-only question)")
    p.add_argument("--question", required=True)
    p.add_argument("--max-new-tokens", type=int, default=512)
    add_model_arguments(p)
    add_image_arguments(p)
    add_decoding_arguments(p)
    add_compile_argument(p)


def run_answer(args) -> int:
    check_decoding_arguments(args)  # options first: nothing is read or loaded for a bad one
    device_from_args(args)
    image = image_from_args(args.image, args)
    model = model_from_args(args)
    print(model.answer(image, args.question, max_new_tokens=args.max_new_tokens, compile=args.compile,
                       **decoding_kwargs(args)))
    return 0


def add_generate_arguments(p) -> None:
    p.add_argument("--image", help="input PNG/JPEG, DICOM or NIfTI file (omit for text-to-image)")
    p.add_argument("--instruction", required=True)
    p.add_argument("--out", required=True, help="output image path (format from the extension, e.g. .png)")
    add_model_arguments(p)
    add_image_arguments(p)
    add_decoding_arguments(p)
    add_compile_argument(p)


def check_output_image(path: str) -> str:
    """The image format Pillow writes for ``path`` (from its extension); checked before any work so a
    bad ``--out`` (a folder, an unknown extension, a missing or read-only folder) costs nothing."""
    from PIL import Image  # here, not at the top: healthgpt.cli's start-up rule

    if os.path.isdir(path):
        raise CLIError(f"--out {path} is a directory; give an image file name such as {os.path.join(path, 'out.png')}")
    out_dir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(out_dir):
        raise CLIError(f"--out directory {out_dir} does not exist")
    if not os.access(out_dir, os.W_OK):
        raise CLIError(f"--out directory {out_dir} is not writable")
    ext = os.path.splitext(path)[1].lower()
    fmt = Image.registered_extensions().get(ext)
    if fmt is None or fmt not in Image.SAVE:
        what = "an image without an extension" if not ext else f"{ext!r} images"
        raise CLIError(f"--out {path}: cannot write {what}; use .png (lossless), .tif or .jpg")
    return fmt


def run_generate(args) -> int:
    check_output_image(args.out)
    check_decoding_arguments(args)  # options first: nothing is read or loaded for a bad one
    device_from_args(args)
    image = image_from_args(args.image, args)
    model = model_from_args(args)
    model.generate_image(image, args.instruction, compile=args.compile, **decoding_kwargs(args)).save(args.out)
    print(args.out)
    return 0


register_answer, main_answer = subcommand("answer", "answer a question about an image (comprehension)", ANSWER_DOC,
                                          add_answer_arguments, run_answer)
register_generate, main_generate = subcommand("generate", "generate an image from an image and/or an instruction",
                                              GENERATE_DOC, add_generate_arguments, run_generate)
