"""Dry run of the device pipeline on a random-weight SmolLM2 (device call 1, before the GGUF has arrived).

Builds a verifier from SmolLM2's config.json alone (random bf16 weights, saved to disk), then runs the same `mtptune`
steps as run.py with the same GPU settings on GSM8K-length token-id prompts: the built-in server with batched
generation, `regenerate` (greedy; random weights rarely emit EOS, so every answer runs to --max-tokens: the worst
case), `prepare`, `convert --init random`, `train` (online epoch, then epochs from the hidden-state cache),
`stitch`, `evaluate offline` and `evaluate generate`. It checks that every CUDA path runs on this machine, warms the
compile caches in /tmp for the real run (same head shapes and --total-seq-len), and measures what the time budget
of device_run.sh depends on. Writes <out>/preflight.json with the measured seconds and a projection for the full
run (1,319 greedy + (N-1) x 1,119 sampled answers, E epochs).

    python examples/smollm2_gsm8k/device_preflight.py --config .smol/a/preflight --device cuda --out $OUT
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # the example's own helpers: Step, Server, server flags

# GSM8K prompt lengths with SmolLM2's chat template (1,319 questions): mean 92, max 218 tokens.
PROMPT_MIN, PROMPT_MEAN, PROMPT_MAX = 45, 92, 218


def cmd(*parts: object) -> list[str]:
    """A command line from words (strings are split on spaces) and values (paths, numbers: one argument each)."""
    out: list[str] = []
    for part in parts:
        out += part.split() if isinstance(part, str) else [str(part)]
    return out


def prompt_lengths(n: int, rng: random.Random) -> list[int]:
    return [min(PROMPT_MAX, max(PROMPT_MIN, int(rng.gauss(PROMPT_MEAN, 25)))) for _ in range(n)]


def build_verifier(config_dir: Path, out: Path, device: str) -> None:
    import torch

    from mtptune.checkpoint.verifier import build_random_causal_lm

    if (out / "model.safetensors").is_file():
        return
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy(config_dir / "config.json", tmp / "config.json")
    model = build_random_causal_lm(tmp, torch.bfloat16, device)
    model.save_pretrained(str(tmp))
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)


def val_times(save: Path) -> list[float]:
    return [row["time"] for row in run.training_curve(save) if "epoch" in row]


def main() -> int:
    try:
        return preflight()
    except BaseException as exc:
        print(f"preflight failed: {type(exc).__name__}: {exc}", flush=True)
        raise


def preflight() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="folder holding SmolLM2's config.json")
    p.add_argument("--work", default="/tmp/smol_preflight")
    p.add_argument("--out", required=True, help="preflight.json goes here")
    p.add_argument("--device", default="cuda")
    p.add_argument("--rows", type=int, default=1024, help="prompts regenerated greedily (and trained on)")
    p.add_argument("--sampled-rows", type=int, default=512, help="of those, also regenerated with sampling")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--concurrency", type=int, default=1024)
    p.add_argument("--server-max-rows", type=int, default=512)
    p.add_argument("--server-max-queue", type=int, default=4096)
    p.add_argument("--total-seq-len", type=int, default=8192)
    p.add_argument("--loss", default="kl")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--eval-rows", type=int, default=32)
    p.add_argument("--eval-prompts", type=int, default=8)
    p.add_argument("--eval-max-tokens", type=int, default=128)
    p.add_argument("--eval-seconds", type=float, default=20.0)
    p.add_argument("--port", type=int, default=8741)
    # What the projection is for (device_run.sh's defaults).
    p.add_argument("--full-answers-per-question", type=int, default=4)
    p.add_argument("--full-epochs", type=int, default=8)
    args = p.parse_args()
    work, out = Path(args.work), Path(args.out)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    found: dict = {"config": vars(args), "seconds": {}, "status": "running"}

    def save() -> None:
        (out / "preflight.json").write_text(json.dumps(found, indent=2) + "\n")

    try:
        return _steps(args, work, out, logs, found, save)
    except BaseException as exc:
        found["status"] = f"failed: {type(exc).__name__}: {exc}"[:1000]
        save()
        raise


def _steps(args, work: Path, out: Path, logs: Path, found: dict, save) -> int:

    def timed(name: str, began: float) -> None:
        found["seconds"][name] = round(time.time() - began, 1)
        print(f"=== {name}: {found['seconds'][name]} s", flush=True)
        save()

    verifier = work / "verifier"
    began = time.time()
    build_verifier(Path(args.config), verifier, args.device)
    timed("build_random_verifier", began)

    rng = random.Random(0)
    lengths = prompt_lengths(args.rows, rng)
    prompts = work / "prompts.jsonl"
    prompts.write_text(
        "".join(
            json.dumps({"id": f"p{i}", "prompt_token_ids": [rng.randrange(3, 49152) for _ in range(n)]}) + "\n"
            for i, n in enumerate(lengths)
        )
    )
    ns = argparse.Namespace(
        server_max_queue=args.server_max_queue,
        server_max_rows=args.server_max_rows,
        server_batch_slots=None,
        max_tokens=args.max_tokens,
        chat_samples=0,
    )
    began = time.time()
    server = run.Server(args.port, args.device, logs / "server.log", 30, run.server_extra_args(ns), str(verifier))
    try:
        timed("server_start", began)
        endpoint = server.url + "/v1"
        regenerated = work / "regenerated.jsonl"
        regenerated.unlink(missing_ok=True)
        began = time.time()
        run.sh(
            cmd("regenerate --data", prompts, "--output", regenerated, "--endpoint", endpoint, "--temperature 0")
            + cmd("--max-tokens", args.max_tokens, "--concurrency", args.concurrency),
            logs / "regenerate.log",
        )
        timed("regenerate", began)
        sampled = work / "regenerated_sampled.jsonl"
        sampled.unlink(missing_ok=True)
        if args.sampled_rows:
            sampled_prompts = work / "prompts_sampled.jsonl"
            rows = [json.loads(line) for line in prompts.read_text().splitlines()[: args.sampled_rows]]
            sampled_prompts.write_text("".join(json.dumps({**r, "id": "s" + r["id"]}) + "\n" for r in rows))
            began = time.time()
            run.sh(
                cmd("regenerate --data", sampled_prompts, "--output", sampled, "--endpoint", endpoint)
                + cmd(
                    "--temperature 0.8 --top-p 0.95 --max-tokens", args.max_tokens, "--concurrency", args.concurrency
                ),
                logs / "regenerate_sampled.log",
            )
            timed("regenerate_sampled", began)
        rows = [
            json.loads(line)
            for path in (regenerated, sampled)
            if path.is_file()
            for line in path.read_text().splitlines()
        ]
        generated = sum(sum(r["loss_mask"]) for r in rows)
        found["regenerate"] = {"answers": len(rows), "generated_tokens": generated}
        train_rows = work / "train_rows.jsonl"
        train_rows.write_text("".join(json.dumps(r) + "\n" for r in rows))

        began = time.time()
        data = work / "data"
        run.sh(
            cmd("prepare --model", verifier, "--data", train_rows, "--output", data, "--overwrite")
            + cmd("--seq-length", args.total_seq_len),
            logs / "prepare.log",
        )
        head = work / "head"
        run.sh(
            cmd("convert", verifier, "--init random --output-path", head, "--overwrite --num-speculative-steps 3"),
            logs / "convert.log",
        )
        timed("prepare_and_convert", began)

        ckpt = work / "checkpoints"
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(work / "hidden_states_cache", ignore_errors=True)
        began = time.time()
        train = ["train", "--verifier-name-or-path", str(verifier), "--from-pretrained", str(head)]
        train += ["--data-path", str(data), "--vllm-endpoint", endpoint, "--save-path", str(ckpt)]
        train += ["--num-speculative-steps", "3", "--target-layer-ids", "30", "--epochs", str(args.epochs)]
        train += ["--lr", "1e-3", "--loss", args.loss, "--total-seq-len", str(args.total_seq_len)]
        train += ["--device", args.device, "--save-best", "--no-progress", "--no-initial-val"]
        train += ["--on-missing", "generate", "--on-generate", "cache"]
        train += ["--hidden-states-path", str(work / "hidden_states_cache")]
        run.sh(train, logs / "train.log")
        timed("train", began)
        ends = val_times(ckpt)
        found["train"] = {
            "tokens": sum(len(r["input_ids"]) for r in rows),
            "epoch_end_s": [round(t - began, 1) for t in ends],
        }
    finally:
        server.stop()

    began = time.time()
    stitched = work / "stitched"
    shutil.rmtree(stitched, ignore_errors=True)
    run.sh(
        ["stitch", str(ckpt / "checkpoint_best"), str(verifier), "--output-path", str(stitched)], logs / "stitch.log"
    )
    timed("stitch", began)
    base = ["--head", stitched, "--verifier", stitched, "--device", args.device]
    began = time.time()
    offline = run.Step(
        cmd("evaluate offline", *base, "--data", data, "--max-rows", args.eval_rows, "--output", work / "eval_offline"),
        logs / "eval_offline.log",
    )
    generate = run.Step(
        cmd("evaluate generate", *base, "--prompts", prompts, "--num-prompts", args.eval_prompts)
        + cmd("--max-new-tokens", args.eval_max_tokens, "--max-seconds", args.eval_seconds)
        + cmd("--output", work / "eval_generate"),
        logs / "eval_generate.log",
    )
    offline.wait()
    generate.wait()
    timed("evaluate_side_by_side", began)
    gen = json.loads((work / "eval_generate" / "result.json").read_text())["generation"]
    found["generate"] = {k: gen[k] for k in ("prompts", "generated_tokens", "seconds", "baseline_seconds")}

    # Projection for device_run.sh's full run (same settings; real answers stop at EOS, so regeneration is less).
    s = found["seconds"]
    epoch_ends = found["train"]["epoch_end_s"]
    full_rows = 1119 * args.full_answers_per_question
    scale = full_rows * (PROMPT_MEAN + 0.75 * args.max_tokens) / max(1, found["train"]["tokens"])
    online = epoch_ends[0] if epoch_ends else s["train"]  # start-up and compile included: over-estimated by scale
    cached = (epoch_ends[-1] - epoch_ends[-2]) if len(epoch_ends) > 1 else online
    per_prompt = (gen["seconds"] + gen["baseline_seconds"]) / max(1, gen["prompts"])
    found["projection_full_run_s"] = {
        "regenerate_greedy_1319": round(s["regenerate"] * 1319 / args.rows),
        "regenerate_sampled": round(
            s.get("regenerate_sampled", s["regenerate"] * args.sampled_rows / args.rows)
            * (args.full_answers_per_question - 1)
            * 1119
            / max(1, args.sampled_rows)
        ),
        "train_epoch0_online_upper_bound": round(online * scale),
        "train_per_cached_epoch": round(cached * scale),
        f"train_{args.full_epochs}_epochs_upper_bound": round(online * scale + (args.full_epochs - 1) * cached * scale),
        "generate_eval_s_per_prompt": round(per_prompt, 2),
        "note": "regeneration scaled by answers at the measured rate, worst case (random weights rarely stop "
        "early; real answers average ~190 of 256 tokens); training scaled by tokens",
    }
    found["status"] = "ok"
    save()
    print(json.dumps(found["projection_full_run_s"], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
