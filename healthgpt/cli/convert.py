"""``healthgpt convert-vqgan`` (taming checkpoint -> image tokenizer directory) and
``healthgpt convert-release`` (the public release's .bin files -> a HealthGPT weights directory).

The model code is imported inside the ``run_*`` functions (see ``healthgpt.cli``: parser start-up)."""

from __future__ import annotations

from healthgpt.cli import CLIError, subcommand

__all__ = ["register_vqgan", "register_release", "run_vqgan", "run_release"]

VQGAN_DOC = """Convert taming's Gumbel VQGAN last.ckpt + model.yaml into an image tokenizer directory.

    healthgpt convert-vqgan --ckpt vqgan/last.ckpt --yaml vqgan/configs/model.yaml --out image_tokenizer/
"""

RELEASE_DOC = """Build a HealthGPT weights directory from the public release's files.

    healthgpt convert-release --preset m3 --llm Phi-3-mini-4k-instruct --vision clip-vit-large-patch14-336 \\
        --image-tokenizer image_tokenizer/ --com com_hlora_weights.bin --gen gen_hlora_weights.bin \\
        --fusion fusion_layer_weights.bin --out weights/
"""


def add_vqgan_arguments(p) -> None:
    p.add_argument("--ckpt", required=True, help="taming last.ckpt")
    p.add_argument("--yaml", required=True, help="taming model.yaml (configs/model.yaml beside the checkpoint)")
    p.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow arbitrary pickled objects in --ckpt (only for a trusted file)")


def run_vqgan(args) -> int:
    from healthgpt.model.vq_convert import convert_taming_checkpoint

    convert_taming_checkpoint(args.ckpt, args.yaml, args.out, trust_pickle=args.trust_pickle)
    print(args.out)
    return 0


def add_release_arguments(p) -> None:
    p.add_argument("--preset", choices=("m3", "l14"), required=True)
    p.add_argument("--llm", required=True, help="local base LLM directory (Phi-3-mini-4k-instruct or phi-4)")
    p.add_argument("--vision", required=True, help="local openai/clip-vit-large-patch14-336 directory")
    p.add_argument("--image-tokenizer", required=True, help="directory written by `healthgpt convert-vqgan`")
    p.add_argument("--com", help="com_hlora_weights.bin (or com_hlora_weights_phi4.bin)")
    p.add_argument("--gen", help="gen_hlora_weights.bin")
    p.add_argument("--fusion", help="fusion_layer_weights.bin")
    p.add_argument("--dtype", default=None, choices=("float32", "float16", "bfloat16"))
    p.add_argument("--out", required=True, help="output HealthGPT weights directory")


def run_release(args) -> int:
    from healthgpt.model.config import HealthGPTConfig
    from healthgpt.model.healthgpt import HealthGPT

    if not (args.com or args.gen or args.fusion):
        raise CLIError("give at least one of --com, --gen, --fusion")
    overrides = dict(llm_path=args.llm, vision_path=args.vision, image_tokenizer_path=args.image_tokenizer)
    if args.dtype:
        overrides["dtype"] = args.dtype
    model = HealthGPT(HealthGPTConfig.preset(args.preset, **overrides))
    model.load_release_weights(com=args.com, gen=args.gen, fusion=args.fusion)
    model.save_pretrained(args.out)
    print(args.out)
    return 0


register_vqgan, main_vqgan = subcommand("convert-vqgan", "convert taming's Gumbel VQGAN last.ckpt + model.yaml",
                                        VQGAN_DOC, add_vqgan_arguments, run_vqgan)
register_release, main_release = subcommand("convert-release", "build a weights directory from the public release's files",
                                            RELEASE_DOC, add_release_arguments, run_release)
