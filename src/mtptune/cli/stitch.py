"""`mtptune stitch`: write a copy of the verifier with the finetuned head's mtp.* tensors."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "stitch",
        help="put a (finetuned) head back into a copy of the verifier",
        description="Copy VERIFIER to --output-path replacing only its mtp.* tensors with CKPT's head, in the "
        "verifier's own names, layout, dtype and shards. Untouched shards are hard-linked (--copy to copy). "
        "The result is verified tensor by tensor; a failure leaves no output. A verifier without a native head "
        "(Llama, e.g. SmolLM2) gets the head attached instead: a new mtp.safetensors shard, an index, and config "
        "fields mtp_num_hidden_layers / mtptune_mtp_family; its own tensors stay bit-identical.",
    )
    parser.add_argument("checkpoint", help="head checkpoint (convert output or a training epoch / checkpoint_best)")
    parser.add_argument("verifier", help="the verifier folder (or cached hub id) the head belongs to")
    parser.add_argument("--output-path", default=None, help="output folder (default: ./<verifier name>-stitched)")
    parser.add_argument("--copy", action="store_true", help="copy untouched shards instead of hard-linking them")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mtptune.stitch import stitch

    report = stitch(
        args.checkpoint, args.verifier, output_path=args.output_path, copy_untouched=args.copy, overwrite=args.overwrite
    )
    untouched = f"{len(report.linked_shards)} hard-linked, {len(report.copied_shards)} copied"
    if report.attached:
        print(
            f"attached {report.replaced} mtp.* tensors (new shard {report.rewritten_shards[0]}) to a copy of the "
            f"verifier in {report.output}; verifier shards: {untouched}; verified bit-identical."
        )
        return 0
    print(
        f"stitched {report.replaced} mtp.* tensors ({report.changed} changed) into {report.output}; "
        f"rewrote {len(report.rewritten_shards)} shard(s), untouched shards: {untouched}; verified."
    )
    return 0
