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


def add_answer_arguments(p) -> None:
    p.add_argument("--image", help="PNG/JPEG, DICOM or NIfTI file (omit for a text-only question)")
    p.add_argument("--question", required=True)
    p.add_argument("--max-new-tokens", type=int, default=512)
    add_model_arguments(p)
    add_image_arguments(p)
    add_decoding_arguments(p)


def run_answer(args) -> int:
    check_decoding_arguments(args)  # options first: nothing is read or loaded for a bad one
    device_from_args(args)
    image = image_from_args(args.image, args)
    model = model_from_args(args)
    print(model.answer(image, args.question, max_new_tokens=args.max_new_tokens, **decoding_kwargs(args)))
    return 0


def add_generate_arguments(p) -> None:
    p.add_argument("--image", help="input PNG/JPEG, DICOM or NIfTI file (omit for text-to-image)")
    p.add_argument("--instruction", required=True)
    p.add_argument("--out", required=True, help="output image path (format from the extension, e.g. .png)")
    add_model_arguments(p)
    add_image_arguments(p)
    add_decoding_arguments(p)


def run_generate(args) -> int:
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise CLIError(f"--out directory {out_dir} does not exist")
    check_decoding_arguments(args)  # options first: nothing is read or loaded for a bad one
    device_from_args(args)
    image = image_from_args(args.image, args)
    model = model_from_args(args)
    model.generate_image(image, args.instruction, **decoding_kwargs(args)).save(args.out)
    print(args.out)
    return 0


register_answer, main_answer = subcommand("answer", "answer a question about an image (comprehension)", ANSWER_DOC,
                                          add_answer_arguments, run_answer)
register_generate, main_generate = subcommand("generate", "generate an image from an image and/or an instruction",
                                              GENERATE_DOC, add_generate_arguments, run_generate)
