"""vLLM's spec-decode counters: parsed from a captured /metrics page, diffed, and scraped around a prompt set."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import ClassVar

import pytest

from mtptune.cli.main import main
from mtptune.errors import DataError
from mtptune.evaluation.prompts import Prompt
from mtptune.evaluation.vllm_metrics import (
    SpecDecodeCounters,
    VllmEndpoint,
    parse_prometheus,
    run_vllm,
    server_root,
    vllm_serve_command,
)
from mtptune.testing.http_stub import QuietHandler, serving

MODEL = "Qwen/Qwen3.5-9B"


def metrics_page(drafts: int, accepted_per_pos: list[int], engines: int = 1) -> str:
    """/metrics as vLLM (prometheus_client) writes it: HELP/TYPE, `_total` + `_created` samples, engine labels,
    plus unrelated metrics and a histogram. Counts are split evenly over the engines."""
    k = len(accepted_per_pos)
    lines = [
        "# HELP python_gc_objects_collected_total Objects collected during gc",
        "# TYPE python_gc_objects_collected_total counter",
        'python_gc_objects_collected_total{generation="0"} 12345.0',
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f'vllm:num_requests_running{{engine="0",model_name="{MODEL}"}} 0.0',
        "# HELP vllm:e2e_request_latency_seconds Histogram of e2e request latency in seconds.",
        "# TYPE vllm:e2e_request_latency_seconds histogram",
        f'vllm:e2e_request_latency_seconds_bucket{{engine="0",le="+Inf",model_name="{MODEL}"}} 7.0',
        f'vllm:e2e_request_latency_seconds_sum{{engine="0",model_name="{MODEL}"}} 3.25',
    ]
    counters = {
        "vllm:spec_decode_num_drafts": [({}, drafts)],
        "vllm:spec_decode_num_draft_tokens": [({}, drafts * k)],
        "vllm:spec_decode_num_accepted_tokens": [({}, sum(accepted_per_pos))],
        "vllm:spec_decode_num_accepted_tokens_per_pos": [
            ({"position": str(i)}, a) for i, a in enumerate(accepted_per_pos)
        ],
    }
    for name, series in counters.items():
        lines += [f"# HELP {name}_total Spec decode counter.", f"# TYPE {name}_total counter"]
        for extra, value in series:
            for e in range(engines):
                labels = {"engine": str(e), "model_name": MODEL, **extra}
                text = ",".join(f'{key}="{v}"' for key, v in labels.items())
                lines.append(f"{name}_total{{{text}}} {value / engines}")
                lines.append(f"{name}_created{{{text}}} 1.7640e+09")
    return "\n".join(lines) + "\n"


def test_parser_reads_the_spec_decode_counters_summed_over_engines() -> None:
    counters = SpecDecodeCounters.parse(metrics_page(1000, [700, 450, 250], engines=2))
    assert counters.drafts == 1000
    assert counters.draft_tokens == 3000
    assert counters.accepted == 1400
    assert counters.accepted_per_pos == {0: 700, 1: 450, 2: 250}
    assert counters.acceptance_length == pytest.approx(2.4)
    counts = counters.acceptance_counts()
    assert counts.unconditional == pytest.approx([0.7, 0.45, 0.25])
    assert counts.acceptance_length == pytest.approx(2.4)


def test_diff_of_two_scrapes_and_labels() -> None:
    before = SpecDecodeCounters.parse(metrics_page(100, [50, 20, 10]))
    after = SpecDecodeCounters.parse(metrics_page(300, [250, 170, 110]))
    delta = after - before
    assert (delta.drafts, delta.accepted) == (200, 450)
    assert delta.acceptance_counts(3).accepted_per_position == [200, 150, 100]
    assert SpecDecodeCounters.parse(metrics_page(100, [50, 20, 10]), model_name="other").drafts == 0
    samples = parse_prometheus('m{a="x\\"y",b="2"} 1.5 1700000000\n')
    assert samples[0].labels == {"a": 'x"y', "b": "2"} and samples[0].value == 1.5
    with pytest.raises(DataError, match="line 1"):
        parse_prometheus("not a sample line at all\n")


def test_server_root_and_serve_command() -> None:
    assert server_root("http://localhost:8000/v1/") == "http://localhost:8000"
    assert server_root("http://localhost:8000") == "http://localhost:8000"
    # Without chunked prefill vLLM refuses a hybrid verifier (Qwen3.5) unless prefix caching is off too.
    assert vllm_serve_command("out/stitched", 3) == (
        "vllm serve out/stitched --speculative-config "
        '\'{"method":"mtp","num_speculative_tokens":3}\' --no-enable-chunked-prefill --no-enable-prefix-caching'
    )


def test_serve_command_for_a_folder_without_tokenizer(tiny_verifier, capsys) -> None:
    """A stitched tiny verifier has no tokenizer: vLLM serves it to token-id prompts only (tests/vllm runs it)."""
    assert main(["evaluate", "vllm", "--serve-command", str(tiny_verifier), "--num-steps", "2"]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[-3:] == ["--no-enable-prefix-caching", "--skip-tokenizer-init", "--language-model-only"]
    assert '\'{"method":"mtp","num_speculative_tokens":2}\'' in printed


class _VllmLike(QuietHandler):
    """The three endpoints the evaluator uses, answering as a speculating vLLM would (each request: 4 drafts)."""

    state: ClassVar[dict] = {"drafts": 40, "per_pos": [20, 10, 5]}

    def do_GET(self) -> None:
        if self.path == "/v1/models":
            self.send_body(json.dumps({"object": "list", "data": [{"id": MODEL, "object": "model"}]}))
        elif self.path == "/metrics":
            self.send_body(metrics_page(self.state["drafts"], self.state["per_pos"]), "text/plain; version=0.0.4")
        else:
            self.send_error(404)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert self.path == "/v1/completions" and body["model"] == MODEL
        self.state["drafts"] += 4
        self.state["per_pos"] = [a + b for a, b in zip(self.state["per_pos"], [3, 2, 1])]
        self.send_body(json.dumps({"choices": [{"text": "x"}], "usage": {"completion_tokens": body["max_tokens"]}}))


@pytest.fixture
def endpoint() -> Iterator[str]:
    with serving(_VllmLike) as base:
        yield base


def test_run_vllm_diffs_counters_around_the_prompt_set(endpoint: str) -> None:
    prompts = [Prompt(f"p{i}", text=f"question {i}") for i in range(5)]
    run = run_vllm(VllmEndpoint(endpoint), prompts, max_tokens=16, concurrency=2)
    assert run.model == MODEL and run.requests == 5 and run.completion_tokens == 80
    counts = run.counters.acceptance_counts()
    assert counts.drafts == 20
    assert counts.accepted_per_position == [15, 10, 5]
    assert counts.acceptance_length == pytest.approx(2.5)


def test_cli_vllm(endpoint: str, tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n")
    assert (
        main(["evaluate", "vllm", "--endpoint", endpoint, "--prompts", str(prompts), "--output", str(tmp_path / "r")])
        == 0
    )
    out = capsys.readouterr().out
    assert "acceptance length" in out and "2.500" in out
    assert json.loads((tmp_path / "r" / "result.json").read_text())["method"] == "vllm"
    assert main(["evaluate", "vllm", "--endpoint", "http://127.0.0.1:9/v1", "--prompts", str(prompts)]) == 2
