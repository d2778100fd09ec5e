"""`mtptune convert`: extract the verifier's native MTP head into a standalone head checkpoint."""

from __future__ import annotations

import argparse
import json

from mtptune.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "convert",
        help="extract the native mtp.* head (or create a fresh one with --init) into a standalone checkpoint",
        description="Read only the mtp.* tensors of MODEL (shard by shard) and write config.json + "
        "model.safetensors of a head checkpoint that `train --from-pretrained`, `stitch` and `evaluate` accept "
        "(--format speculators: in speculators' MTP format, which they accept too).",
    )
    parser.add_argument("model", help="checkpoint folder (or cached hub id) holding the native mtp.* tensors")
    parser.add_argument("--verifier", help="base model whose config builds the head (default: MODEL)")
    parser.add_argument("--algorithm", default="mtp", help="only 'mtp' (accepted for speculators compatibility)")
    parser.add_argument("--output-path", default="converted", help="output folder (default: ./converted)")
    parser.add_argument("--num-speculative-steps", type=int, default=None, help="K recorded in the head (default 3)")
    parser.add_argument("--algorithm-kwargs", default=None, help="JSON, e.g. '{\"num_speculative_steps\": 3}'")
    parser.add_argument("--validate-device", default=None, help="run a short forward on this device (cpu, cuda:0)")
    parser.add_argument(
        "--format",
        choices=("mtptune", "speculators"),
        default="mtptune",
        help="output format: mtptune's head checkpoint (default) or speculators' MTP format (mtp_layers.0.* names), "
        "which speculators 0.9.0 loads, trains and stitches and mtptune reads back",
    )
    parser.add_argument(
        "--init",
        choices=("fresh", "copy-last-layer", "random"),
        default=None,
        help="create a new head instead of extracting the native one; required for a verifier without mtp.* "
        "tensors (Llama, e.g. SmolLM2). copy-last-layer: block = the verifier's last decoder layer, fc = [small "
        "random | I]; random: N(0, initializer_range); fresh: the measured better of the two (docs/results.md)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the fresh head's random parts (with --init)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from mtptune.convert import convert_model

    kwargs = {}
    if args.algorithm_kwargs:
        try:
            kwargs = json.loads(args.algorithm_kwargs)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--algorithm-kwargs is not valid JSON: {exc}") from exc
        if not isinstance(kwargs, dict):
            raise ConfigError("--algorithm-kwargs must be a JSON object.")
    if args.num_speculative_steps is not None:
        if "num_speculative_steps" in kwargs and kwargs["num_speculative_steps"] != args.num_speculative_steps:
            raise ConfigError("--num-speculative-steps conflicts with --algorithm-kwargs num_speculative_steps.")
        kwargs["num_speculative_steps"] = args.num_speculative_steps
    out = convert_model(
        args.model,
        verifier=args.verifier,
        algorithm=args.algorithm,
        output_path=args.output_path,
        validate_device=args.validate_device,
        overwrite=args.overwrite,
        format=args.format,
        init=args.init,
        seed=args.seed,
        **kwargs,
    )
    made = f"a fresh head (--init {args.init})" if args.init else "head checkpoint"
    print(f"wrote {made} {out} ({args.format} format)")
    return 0
