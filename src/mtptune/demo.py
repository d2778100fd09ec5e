"""`mtptune demo`: the whole tutorial pipeline on a built-in tiny verifier, on CPU, in a few minutes.

Every step runs the real subcommand in-process (`mtptune.cli.main.main([...])`, printed as a user would type it);
the hidden-state server is a real `mtptune serve --engine builtin` subprocess spoken to over HTTP:

    0 build     a tiny Qwen3.5 verifier trained to continue "stride counting" prompts predictably, with a random
                native mtp.* head (cached in the output folder)
    1 convert   extract the native head (the "before" head)
    2 serve     the built-in hidden-state server (subprocess; /health polled)
    3 data      the verifier's own greedy continuations of token-id prompts (`mtptune regenerate`: POST
                /v1/completions with return_token_ids), written as token-id rows; then `mtptune prepare`. A
                held-out test split of distinct prompts is never trained on
    4 train     online training with the tutorial's flags (--on-missing generate --on-generate delete)
    5 stitch    the finetuned head back into a copy of the verifier
    6 evaluate  offline tau_sim (teacher-forced) and real speculative decoding (lossless check) on the held-out
                split, before (native head) vs after (stitched verifier); report JSON/CSV/PNG

The server is always shut down, also on Ctrl-C, SIGTERM and errors.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import httpx

from mtptune.errors import ConfigError, MtpTuneError, ServerError
from mtptune.serving.server_config import free_port

MARKER_FILE = ".mtptune-demo"
SUMMARY_FILE = "summary.json"


class DemoError(MtpTuneError):
    """A demo step failed or a check did not hold."""


@dataclass(frozen=True)
class DemoConfig:
    output: Path = Path("demo_output")
    samples: int = 128  # training rows (target-regenerated continuations of distinct prompts)
    test_samples: int = 16  # held-out rows (prompts never trained on)
    epochs: int = 10
    lr: float = 3e-3
    total_seq_len: int = 256
    generate_prompts: int = 4  # held-out prompts decoded speculatively (lossless check)
    max_new_tokens: int = 40
    num_steps: int = 3
    port: int = 0  # 0: a free port
    keep: bool = False
    overwrite: bool = False
    quick: bool = False
    threads: int = 1  # torch threads in this process (tiny matmuls: 1 is fastest on a shared 2-core box)


def quick_config(config: DemoConfig) -> DemoConfig:
    """`--quick` (CI smoke test, ~40 s on 2 cores): fewer rows, epochs and prompts; still clearly learns."""
    return replace(config, samples=64, test_samples=8, epochs=6, generate_prompts=2, max_new_tokens=24)


@dataclass(frozen=True)
class DemoPaths:
    root: Path

    @property
    def verifier(self) -> Path:
        return self.root / "verifier"

    @property
    def verifier_stamp(self) -> Path:
        return self.root / "verifier.json"

    @property
    def converted(self) -> Path:
        return self.root / "converted"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def train_prompts(self) -> Path:
        return self.data / "train_prompts.jsonl"

    @property
    def test_prompts(self) -> Path:
        return self.data / "test_prompts.jsonl"

    @property
    def train_rows(self) -> Path:
        return self.data / "train.jsonl"

    @property
    def test_rows(self) -> Path:
        return self.data / "test.jsonl"

    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    @property
    def server_storage(self) -> Path:
        return self.root / "server_hidden_states"

    @property
    def server_log(self) -> Path:
        return self.root / "server.log"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def stitched(self) -> Path:
        return self.root / "stitched"

    @property
    def report(self) -> Path:
        return self.root / "report"

    def step_outputs(self) -> list[Path]:
        """Everything steps 1-6 write (removed before a fresh run; the cached verifier is not in it)."""
        return [
            self.converted,
            self.data,
            self.prepared,
            self.server_storage,
            self.server_log,
            self.checkpoints,
            self.stitched,
            self.report,
            self.root / SUMMARY_FILE,
        ]


@dataclass
class DemoResult:
    output: Path
    timings: dict[str, float] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    verifier_accuracy: float | None = None
    offline_before: float | None = None
    offline_after: float | None = None
    generate_before: float | None = None
    generate_after: float | None = None
    checks: dict[str, bool] = field(default_factory=dict)

    def to_json(self) -> dict:
        body = asdict(self)
        body["output"] = str(self.output)
        return body


def display_path(path: str | Path) -> str:
    """Paths as a user would type them: relative to the current folder when inside it."""
    absolute = Path(os.path.abspath(path))  # not resolve(): checkpoint_best is a symlink to keep by name
    with contextlib.suppress(ValueError):
        return str(absolute.relative_to(Path(os.path.abspath(Path.cwd())))) or "."
    return str(path)


class Demo:
    def __init__(self, config: DemoConfig) -> None:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per hidden-state request otherwise
        self.config = config
        self.paths = DemoPaths(config.output)
        self.result = DemoResult(config.output)
        self.stack = contextlib.ExitStack()
        self.server_url: str | None = None
        self.ran: set[str] = set()  # steps that ran (not kept) in this invocation: their dependents rerun
        self.model = display_path(self.paths.verifier)  # also the server's model id (the trainer sends it)

    # ---------------------------------------------------------------- plumbing

    def say(self, text: str = "") -> None:
        print(text, flush=True)

    @contextlib.contextmanager
    def step(self, name: str, title: str) -> Iterator[None]:
        self.say(f"\n=== {title}")
        start = time.monotonic()
        yield
        seconds = time.monotonic() - start
        self.result.timings[name] = round(seconds, 1)
        self.say(f"--- {name}: {seconds:.1f} s")

    def show(self, argv: list[str], comment: str = "") -> None:
        line = "$ " + shlex.join(argv) + (f"   # {comment}" if comment else "")
        self.result.commands.append(line[2:])
        self.say(line)

    def cli(self, *argv: str) -> None:
        """Run `mtptune ARGV` in-process exactly as printed."""
        from mtptune.cli.main import main

        self.show(["mtptune", *argv])
        saved = sys.argv
        sys.argv = ["mtptune", *argv]  # the trainer records its command line in train_command.txt
        try:
            rc = main(list(argv))
        finally:
            sys.argv = saved
        if rc == 130:
            raise KeyboardInterrupt
        if rc != 0:
            raise DemoError(f"`mtptune {argv[0]}` failed (exit {rc}); see the messages above.")

    # ---------------------------------------------------------------- output folder

    def prepare_output(self) -> None:
        root, c = self.paths.root, self.config
        if root.exists() and not root.is_dir():
            raise ConfigError(f"--output {root}: exists and is not a folder.")
        if root.is_dir() and any(root.iterdir()) and not (root / MARKER_FILE).exists():
            raise ConfigError(
                f"--output {root}: a non-empty folder that is not a demo output folder; choose another --output."
            )
        root.mkdir(parents=True, exist_ok=True)
        (root / MARKER_FILE).write_text("written by `mtptune demo`; safe to delete\n")
        if c.keep:
            return
        stale = self.paths.step_outputs()
        if c.overwrite:
            stale += [self.paths.verifier, self.paths.verifier_stamp]
        removed = [p for p in stale if p.exists() or p.is_symlink()]
        for p in removed:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
        if removed:
            what = "everything" if c.overwrite else "the previous run's outputs (the cached verifier is kept)"
            self.say(f"fresh run in {display_path(root)}: removed {what}")

    # ---------------------------------------------------------------- steps

    def build_verifier(self) -> None:
        from mtptune.testing.learnable import LearnableSpec, train_verifier
        from mtptune.testing.tiny import write_tiny_verifier

        spec = LearnableSpec()
        wanted = {"spec": repr(spec)}
        stamp = self.paths.verifier_stamp
        if stamp.is_file() and self.paths.verifier.is_dir():
            cached = json.loads(stamp.read_text())
            if cached.get("spec") == wanted["spec"]:
                self.result.verifier_accuracy = cached.get("greedy_accuracy")
                self.say(
                    f"reusing the cached verifier {self.model} (greedy accuracy {cached.get('greedy_accuracy'):.3f}; "
                    "--overwrite rebuilds it)"
                )
                return
        if self.paths.verifier.exists():
            shutil.rmtree(self.paths.verifier)
        stamp.unlink(missing_ok=True)
        t = spec.tiny
        self.say(
            f"training a tiny Qwen3.5 verifier (hidden {t.hidden_size}, {t.num_hidden_layers} layers, vocab "
            f"{t.vocab_size}) on stride-counting text for {spec.train_steps} steps; its native mtp.* head stays random"
        )
        model, accuracy = train_verifier(spec)
        write_tiny_verifier(self.paths.verifier, spec.tiny, model=model)
        self.result.verifier_accuracy = accuracy
        stamp.write_text(json.dumps({**wanted, "greedy_accuracy": accuracy}, indent=2) + "\n")
        self.say(f"wrote {self.model} (greedy next-token accuracy on fresh pattern rows: {accuracy:.3f})")

    def convert(self) -> None:
        if self.config.keep and (self.paths.converted / "config.json").is_file():
            self.say(f"kept {display_path(self.paths.converted)} (--keep)")
            return
        self.cli("convert", self.model, "--output-path", display_path(self.paths.converted))

    def data_done(self) -> bool:
        p = self.paths
        return all(f.exists() for f in (p.train_rows, p.test_rows, p.test_prompts, p.prepared / "report.json"))

    def train_done(self) -> bool:
        best = self.paths.checkpoints / "checkpoint_best"
        return best.exists() and (self.paths.checkpoints / str(self.config.epochs - 1)).is_dir()

    def needs_server(self) -> bool:
        return not (self.config.keep and self.data_done() and self.train_done())

    def ensure_server(self) -> str:
        if self.server_url is None:
            self.server_url = self.stack.enter_context(self.serve())
        return self.server_url

    @contextlib.contextmanager
    def serve(self, startup_timeout: float = 120.0) -> Iterator[str]:
        """`mtptune serve MODEL --engine builtin` as a subprocess; yields its base URL once /health is 200."""
        port = self.config.port or free_port()
        argv = ["serve", self.model, "--engine", "builtin", "--port", str(port)]
        argv += ["--hidden-states-path", display_path(self.paths.server_storage)]
        self.show(["mtptune", *argv], "in the background (log: " + display_path(self.paths.server_log) + ")")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        base = f"http://127.0.0.1:{port}"
        with self.paths.server_log.open("w") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "mtptune.cli.main", *argv], stdout=log, stderr=subprocess.STDOUT, env=env
            )
        try:
            start = time.monotonic()
            while True:
                if proc.poll() is not None:
                    raise ServerError(f"the server exited with code {proc.returncode}:\n{self._server_log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(base + "/health", timeout=1.0).status_code == 200:
                        break
                if time.monotonic() - start > startup_timeout:
                    raise ServerError(
                        f"the server was not healthy after {startup_timeout:.0f} s:\n{self._server_log_tail()}"
                    )
                time.sleep(0.2)
            self.say(f"GET {base}/health -> 200 after {time.monotonic() - start:.1f} s (pid {proc.pid})")
            yield base
        finally:
            stopped = _stop_process(proc)
            self.say(f"server pid {proc.pid} stopped ({stopped})")

    def _server_log_tail(self) -> str:
        try:
            return self.paths.server_log.read_text()[-3000:]
        except OSError:
            return "(no server log)"

    def make_data(self) -> None:
        from mtptune.testing.learnable import LearnableSpec

        p, c = self.paths, self.config
        if c.keep and self.data_done():
            self.say(f"kept {display_path(p.data)} and {display_path(p.prepared)} (--keep)")
            return
        self.ran.add("data")
        if p.data.exists():
            shutil.rmtree(p.data)
        if p.prepared.exists():
            shutil.rmtree(p.prepared)
        p.data.mkdir(parents=True)
        train, test = demo_prompts(LearnableSpec(), c.samples, c.test_samples, c.max_new_tokens)
        _write_jsonl(p.train_prompts, [{"prompt_token_ids": ids, "max_tokens": n} for ids, n in train])
        _write_jsonl(p.test_prompts, [{"prompt_token_ids": ids, "max_tokens": n} for ids, n in test])
        base = self.ensure_server()
        start = time.monotonic()
        for prompts, rows in ((p.train_prompts, p.train_rows), (p.test_prompts, p.test_rows)):
            # greedy; each prompt row carries its own max_tokens
            self.cli(
                "regenerate", "--data", display_path(prompts), "--output", display_path(rows),
                "--endpoint", f"{base}/v1", "--temperature", "0", "--concurrency", "8",
            )  # fmt: skip
        tokens = sum(sum(json.loads(line)["loss_mask"]) for f in (p.train_rows, p.test_rows) for line in f.open())
        self.say(
            f"the verifier wrote {tokens} tokens in {time.monotonic() - start:.1f} s: {len(train)} training rows -> "
            f"{display_path(p.train_rows)}, {len(test)} held-out rows -> {display_path(p.test_rows)} "
            "(token-id format: input_ids + loss_mask, prompt 0 / continuation 1)"
        )
        self.cli(
            "prepare", "--model", self.model, "--data", display_path(p.train_rows), "--output", display_path(p.prepared)
        )

    def train(self) -> None:
        p, c = self.paths, self.config
        best = p.checkpoints / "checkpoint_best"
        if c.keep and "data" not in self.ran and self.train_done():
            self.say(f"kept {display_path(p.checkpoints)} (--keep)")
            return
        if "data" in self.ran and p.checkpoints.exists():
            shutil.rmtree(p.checkpoints)  # never resume a run on other data
        self.ran.add("train")
        from mtptune.checkpoint.verifier import Verifier

        n_layers = Verifier.open(str(p.verifier)).text_config.num_hidden_layers
        base = self.ensure_server()
        self.cli(
            "train",
            "--verifier-name-or-path", self.model,
            "--data-path", display_path(p.prepared),
            "--vllm-endpoint", base + "/v1",
            "--save-path", display_path(p.checkpoints),
            "--speculator-type", "mtp",
            "--num-speculative-steps", str(c.num_steps),
            "--target-layer-ids", str(n_layers),
            "--step-weight-beta", "0.6",
            "--epochs", str(c.epochs),
            "--lr", f"{c.lr:g}",
            "--total-seq-len", str(c.total_seq_len),
            "--on-missing", "generate",
            "--on-generate", "delete",
        )  # fmt: skip
        storage = [d for d in (p.server_storage, p.prepared / "hidden_states") if d.exists()]
        leftovers = [str(f) for d in storage for f in d.iterdir()]
        self.check("no hidden-state files left (--on-generate delete)", not leftovers, f"left: {leftovers[:5]}")
        self.check("checkpoint_best exists", (best / "model.safetensors").is_file(), f"{best} is missing")
        self.say(f"    {display_path(best)} -> {os.readlink(best)}")

    def stitch(self) -> None:
        p = self.paths
        if self.config.keep and "train" not in self.ran and (p.stitched / "config.json").is_file():
            self.say(f"kept {display_path(p.stitched)} (--keep)")
            return
        if p.stitched.exists():
            shutil.rmtree(p.stitched)
        best = display_path(p.checkpoints / "checkpoint_best")
        self.cli("stitch", best, self.model, "--output-path", display_path(p.stitched))
        changed = mtp_only_difference(p.verifier, p.stitched)
        self.check("the stitched verifier differs from the original only in mtp.*", changed is not None, "see above")

    def evaluate(self) -> None:
        from mtptune.evaluation.report import BASELINE_FILE
        from mtptune.evaluation.result import RESULT_FILE, EvaluationResult

        p, c = self.paths, self.config
        offline, generate = p.report / "offline", p.report / "generate"
        for d in (offline, generate):
            if d.exists():
                shutil.rmtree(d)
        heads = ["--head", display_path(p.stitched), "--baseline-head", display_path(p.converted)]
        self.cli(
            "evaluate", "offline", *heads,
            "--data", display_path(p.test_rows),
            "--output", display_path(offline),
            "--training-metrics", display_path(p.checkpoints),
        )  # fmt: skip
        self.say()
        self.cli(
            "evaluate", "generate", *heads,
            "--prompts", display_path(p.test_prompts),
            "--num-prompts", str(c.generate_prompts),
            "--max-new-tokens", str(c.max_new_tokens),
            "--output", display_path(generate),
        )  # fmt: skip
        off_b, off_a = EvaluationResult.load(offline / BASELINE_FILE), EvaluationResult.load(offline / RESULT_FILE)
        gen_b, gen_a = EvaluationResult.load(generate / BASELINE_FILE), EvaluationResult.load(generate / RESULT_FILE)
        r = self.result
        r.offline_before, r.offline_after = off_b.acceptance_length, off_a.acceptance_length
        r.generate_before, r.generate_after = gen_b.acceptance_length, gen_a.acceptance_length
        self.say("\n" + summary_table(off_b, off_a, gen_b, gen_a))
        self.check(
            "held-out acceptance is higher after finetuning",
            off_a.acceptance_length > off_b.acceptance_length and gen_a.acceptance_length > gen_b.acceptance_length,
            f"offline {off_b.acceptance_length:.3f} -> {off_a.acceptance_length:.3f}, generate "
            f"{gen_b.acceptance_length:.3f} -> {gen_a.acceptance_length:.3f}",
        )
        self.check(
            "speculative decoding was lossless (token-for-token equal to greedy)",
            bool(gen_a.generation and gen_a.generation.lossless_checked),
            "the lossless check did not run",
        )

    def check(self, name: str, ok: bool, detail: str) -> None:
        self.result.checks[name] = ok
        self.say(f"check: {name}: {'ok' if ok else 'FAILED (' + detail + ')'}")
        if not ok:
            raise DemoError(f"check failed: {name} ({detail})")

    # ---------------------------------------------------------------- all of it

    def run(self) -> DemoResult:
        c = self.config
        total = time.monotonic()
        self.prepare_output()
        self.say(
            f"mtptune demo -> {display_path(c.output)}: {c.samples} training rows, {c.test_samples} held-out rows, "
            f"{c.epochs} epochs, K={c.num_steps}" + (" (--quick)" if c.quick else "")
        )
        with self.stack:
            with self.step("build", "[0/6] build: a tiny verifier with a native MTP head (cached)"):
                self.build_verifier()
            with self.step("convert", "[1/6] convert: extract the native mtp.* head (the 'before' head)"):
                self.convert()
            with self.step("serve", "[2/6] serve: the built-in hidden-state server (a subprocess)"):
                if self.needs_server():
                    self.ensure_server()
                else:
                    self.say("not needed: data and checkpoints are kept (--keep)")
            with self.step("data", "[3/6] data: the verifier's own continuations of token-id prompts, then prepare"):
                self.make_data()
            with self.step("train", "[4/6] train: online, hidden states from the server, deleted after use"):
                self.train()
                self.stack.close()  # evaluation runs the verifier in-process; stop the server now
            with self.step("stitch", "[5/6] stitch: the finetuned head into a copy of the verifier"):
                self.stitch()
            with self.step("evaluate", "[6/6] evaluate on the held-out split: before vs after"):
                self.evaluate()
        self.result.timings["total"] = round(time.monotonic() - total, 1)
        (c.output / SUMMARY_FILE).write_text(json.dumps(self.result.to_json(), indent=2) + "\n")
        self.say(self.closing())
        return self.result

    def closing(self) -> str:
        r, p = self.result, self.paths
        timings = ", ".join(f"{k} {v:.1f} s" for k, v in r.timings.items() if k != "total")
        lines = [
            "",
            f"done in {r.timings['total']:.1f} s ({timings})",
            f"acceptance length on held-out rows: {r.offline_before:.2f} -> {r.offline_after:.2f} (offline tau_sim), "
            f"{r.generate_before:.2f} -> {r.generate_after:.2f} (real speculative decoding)",
            f"report: {display_path(p.report / 'offline')}/{{result.json,baseline.json,acceptance.csv,acceptance.png}}, "
            f"{display_path(p.report / 'generate')}/...; summary: {display_path(p.root / SUMMARY_FILE)}",
            f"serve it with vLLM on a GPU: mtptune evaluate vllm --serve-command {display_path(p.stitched)}",
        ]
        return "\n".join(lines)


def demo_prompts(
    spec, samples: int, test_samples: int, max_new_tokens: int, seed: int = 0
) -> tuple[list[tuple[list[int], int]], list[tuple[list[int], int]]]:
    """Token-id prompts (marker + the first values of a stride-counting document) with their `max_tokens`.

    The held-out prompts are distinct (stride, start) pairs that no training prompt uses; training prompts cycle
    through the rest, with varied continuation lengths (as documents of varied length)."""
    from mtptune.testing.learnable import marker

    pairs = [(s, a) for s in spec.strides for a in range(spec.modulus)]
    rng = random.Random(seed)
    rng.shuffle(pairs)
    if test_samples >= len(pairs):
        raise ConfigError(f"--test-samples must be below {len(pairs)} (the distinct prompts of the built-in task).")
    held_out, pool = pairs[:test_samples], pairs[test_samples:]
    first = spec.prompt_len - 1
    longest = spec.max_len - spec.prompt_len  # the verifier was trained on documents up to max_len tokens

    def prompt(stride: int, start: int) -> list[int]:
        return [marker(spec, stride)] + [spec.base + (start + i * stride) % spec.modulus for i in range(first)]

    train = [
        (prompt(*pool[i % len(pool)]), rng.randint(spec.min_len - spec.prompt_len, longest)) for i in range(samples)
    ]
    test = [(prompt(*pair), min(max_new_tokens, longest)) for pair in held_out]
    return train, test


def mtp_only_difference(original: Path, stitched: Path) -> list[str] | None:
    """Names of the tensors that differ (all mtp.*), or None if anything else differs or a tensor is missing."""
    import torch
    from safetensors.torch import load_file

    def tensors(root: Path) -> dict:
        out: dict = {}
        for f in sorted(root.glob("*.safetensors")):
            out.update(load_file(f))
        return out

    a, b = tensors(original), tensors(stitched)
    if a.keys() != b.keys():
        return None
    changed = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    if any(not k.startswith("mtp.") for k in changed):
        return None
    return changed


def summary_table(off_b, off_a, gen_b, gen_a) -> str:
    """Before/after: offline tau_sim (teacher-forced) and real speculative decoding on the held-out split."""
    k = off_a.num_steps
    rows: list[tuple[str, str, str]] = [
        ("held-out split", "before (native head)", "after (finetuned)"),
        ("offline tau_sim (acceptance length)", f"{off_b.acceptance_length:.3f}", f"{off_a.acceptance_length:.3f}"),
    ]
    rows += [
        (
            f"  p_{i} (unconditional acceptance)",
            f"{off_b.counts.unconditional[i]:.3f}",
            f"{off_a.counts.unconditional[i]:.3f}",
        )
        for i in range(k)
    ]
    rows.append(
        ("speculative decoding: acceptance length", f"{gen_b.acceptance_length:.3f}", f"{gen_a.acceptance_length:.3f}")
    )
    rows += [
        (f"  p_{i}", f"{gen_b.counts.unconditional[i]:.3f}", f"{gen_a.counts.unconditional[i]:.3f}") for i in range(k)
    ]
    if gen_a.generation and gen_b.generation:
        rows.append(
            (
                "  verifier steps (greedy needs)",
                f"{gen_b.generation.verifier_steps} ({gen_b.generation.baseline_verifier_steps})",
                f"{gen_a.generation.verifier_steps} ({gen_a.generation.baseline_verifier_steps})",
            )
        )
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0].ljust(w[0])}  {r[1].rjust(w[1])}  {r[2].rjust(w[2])}" for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> str:
    if proc.poll() is not None:
        return f"had exited with code {proc.returncode}"
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
        return "terminated"
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return "killed after SIGTERM timed out"


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt (so the server subprocess is stopped on the way out)."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_demo(config: DemoConfig) -> DemoResult:
    import torch

    if config.keep and config.overwrite:
        raise ConfigError("--keep and --overwrite are mutually exclusive.")
    if config.samples < 8 or config.epochs < 1:
        raise ConfigError("--samples must be at least 8 and --epochs at least 1.")
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with sigterm_as_interrupt():
            return Demo(config).run()
    except KeyboardInterrupt:
        again = shlex.join(["mtptune", "demo", "--output", display_path(config.output), "--keep"])
        print(f"\ninterrupted; `{again}` resumes where it stopped", flush=True)
        raise
    finally:
        torch.set_num_threads(threads)
