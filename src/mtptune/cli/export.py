"""`mtptune export`: re-write a head checkpoint in speculators' MTP format (or back into mtptune's)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "export",
        help="write a head checkpoint in speculators' MTP format (or mtptune's)",
        description="Read CKPT (an mtptune head checkpoint: convert output, a training epoch, checkpoint_best; or a "
        "speculators MTP checkpoint) and write the same head, values unchanged, in --format. speculators format: "
        "config.json (speculators_model_type 'mtp') + model.safetensors with mtp_layers.0.* names and no "
        "embed/lm_head, which speculators 0.9.0 loads with its from_pretrained and stitches with `stitch-mtp`.",
    )
    parser.add_argument("checkpoint", help="head checkpoint folder (mtptune or speculators format)")
    parser.add_argument("--format", choices=("speculators", "mtptune"), default="speculators", help="output format")
    parser.add_argument("--output-path", required=True, help="output folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mtptune.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.output_path, format=args.format, overwrite=args.overwrite)
    print(f"wrote {args.format} head checkpoint {out}")
    return 0
