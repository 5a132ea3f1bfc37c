"""``healthgpt data``: convert public datasets, build the bundled sample set, check a training file.

    healthgpt data convert vqa-rad  /data/VQA_RAD        --out train/vqarad.json
    healthgpt data convert slake    /data/Slake1.0       --out train/slake.json --split train
    healthgpt data convert pathvqa  /data/pvqa           --out train/pathvqa.json
    healthgpt data convert synthrad2023 /data/synthRAD2023 --out train/synthrad.json --direction both
    healthgpt data convert ixi      /data/IXI            --out train/ixi.json --factor 4
    healthgpt data merge train/stage3-comp.json train/vqarad.json train/slake.json train/pathvqa.json
    healthgpt data samples                                # the sample set the demo uses; prints its files
    healthgpt data check train/stage3-comp.json [--skip-bad]
"""

from __future__ import annotations

import argparse
import sys

from healthgpt.cli import CLIError, subcommand

__all__ = ["add_data_arguments", "run_data", "register"]


def add_data_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = parser.add_subparsers(dest="data_command", required=True)
    c = sub.add_parser("convert", help="a public dataset's files -> a training file")
    c.add_argument("dataset", choices=("vqa-rad", "slake", "pathvqa", "synthrad2023", "ixi"))
    c.add_argument("root", help="the dataset's folder, in its public layout")
    c.add_argument("--out", required=True, help="training file to write (.json or .jsonl); generation PNGs go under its images/")
    c.add_argument("--split", default=None, help="vqa-rad: train|test|all; slake: train|validate|test; pathvqa: train|val|test")
    c.add_argument("--lang", default="en", help="slake: question language to keep ('all' for every language)")
    c.add_argument("--direction", default="both", choices=("ct2mr", "mr2ct", "both"), help="synthrad2023")
    c.add_argument("--regions", default="brain,pelvis", help="synthrad2023: comma-separated")
    c.add_argument("--ct-window", default=None,
                   help="synthrad2023: CENTER,WIDTH in HU, DICOM's linear VOI window (default per region)")
    c.add_argument("--modalities", default="T1,T2,PD", help="ixi: comma-separated")
    c.add_argument("--factor", type=int, default=4, help="ixi: downsampling factor of the low-resolution input")
    c.add_argument("--stride", type=int, default=None, help="synthrad2023/ixi: keep every N-th eligible slice")
    c.add_argument("--max-slices", type=int, default=None, help="synthrad2023/ixi: at most N slices per volume")
    c.add_argument("--skip-bad", action="store_true", help="skip (and count) rows with missing images instead of stopping")
    m = sub.add_parser("merge", help="concatenate training files (image paths rewritten)")
    m.add_argument("out")
    m.add_argument("inputs", nargs="+")
    s = sub.add_parser("samples", help="build the bundled sample set from images inside installed wheels")
    s.add_argument("--cache-dir", default=None)
    s.add_argument("--force", action="store_true", help="rebuild even if cached")
    k = sub.add_parser("check", help="validate a training file")
    k.add_argument("file")
    k.add_argument("--image-folder", default=None)
    k.add_argument("--skip-bad", action="store_true", help="report bad rows by reason instead of stopping at the first")
    return parser


def _ct_window(text: str) -> tuple:
    try:
        center, width = (float(v) for v in text.split(","))
    except ValueError:
        raise CLIError(f"--ct-window must be CENTER,WIDTH (two numbers), got {text!r}") from None
    return center, width


def run_data(args: argparse.Namespace) -> int:
    """Run ``healthgpt data``; errors are raised (``healthgpt.cli.run_guarded`` reports them).
    The modules doing the work are imported here, not at the top (``healthgpt.cli``: start-up)."""
    if args.data_command == "convert":
        from healthgpt.data import converters

        kw = {"skip_bad": args.skip_bad}
        if args.dataset in ("vqa-rad", "slake", "pathvqa") and args.split:
            kw["split"] = args.split
        if args.dataset == "slake":
            kw["lang"] = None if args.lang == "all" else args.lang
        if args.dataset == "synthrad2023":
            kw.update(direction=args.direction, regions=tuple(r for r in args.regions.split(",") if r))
            if args.ct_window:
                kw["ct_window"] = _ct_window(args.ct_window)
        if args.dataset == "ixi":
            kw.update(modalities=tuple(m for m in args.modalities.split(",") if m), factor=args.factor)
        if args.dataset in ("synthrad2023", "ixi"):
            if args.stride:
                kw["stride"] = args.stride
            kw["max_slices"] = args.max_slices
        report = converters.CONVERTERS[args.dataset](args.root, args.out, **kw)
        print(report.summary())
        for msg in report.examples:
            print("  skipped: " + msg)
        return 0
    if args.data_command == "merge":
        from healthgpt.data.converters import merge_files
        from healthgpt.data.format import load_samples

        path = merge_files(args.inputs, args.out)
        print(load_samples(path, skip_bad=True)[1].summary())
        return 0
    if args.data_command == "samples":
        from healthgpt.data.samples import build_sample_set

        s = build_sample_set(args.cache_dir, force=args.force)
        print(f"sample set in {s.root}")
        for name in ("align", "mixed", "instruct"):
            print(f"  {name:9s} {getattr(s, name)}")
        return 0
    if args.data_command == "check":
        from healthgpt.data.format import load_samples

        samples, report = load_samples(args.file, image_folder=args.image_folder, skip_bad=args.skip_bad)
        print(report.summary())
        for msg in report.examples:
            print("  " + msg)
        tasks = [s.task for s in samples]
        print(f"  comp {tasks.count('comp')}, gen {tasks.count('gen')}")
        return 0 if not report.skipped else 1
    raise CLIError(f"unknown data command {args.data_command!r}")


register, main = subcommand("data", "convert datasets, build the sample set, check training files", __doc__,
                            add_data_arguments, run_data)


if __name__ == "__main__":
    sys.exit(main())
