"""Acceptance from a running vLLM: its spec-decode Prometheus counters, scraped before and after a prompt set.

Counters (docs/contracts.md, "Acceptance metrics"), on the wire with a `_total` suffix, at `GET <server root>/metrics`
(not under /v1): `vllm:spec_decode_num_drafts`, `vllm:spec_decode_num_draft_tokens`,
`vllm:spec_decode_num_accepted_tokens`, `vllm:spec_decode_num_accepted_tokens_per_pos{position="k"}`. Labels such as
model_name / engine are summed over. AL = 1 + accepted / drafts; p_k = accepted_per_pos[k] / drafts.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mtptune.errors import DataError, ServerError
from mtptune.evaluation.prompts import Prompt, chat_messages
from mtptune.metrics.acceptance import AcceptanceCounts

DRAFTS = "vllm:spec_decode_num_drafts"
DRAFT_TOKENS = "vllm:spec_decode_num_draft_tokens"
ACCEPTED = "vllm:spec_decode_num_accepted_tokens"
ACCEPTED_PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"

_SAMPLE = re.compile(r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class Sample:
    name: str
    labels: dict[str, str]
    value: float


def parse_prometheus(text: str) -> list[Sample]:
    """Samples of the Prometheus text exposition format (HELP/TYPE/comment lines skipped)."""
    samples = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if m is None:
            raise DataError(f"/metrics line {lineno} is not a Prometheus sample: {raw[:120]!r}")
        labels = {k: bytes(v, "utf-8").decode("unicode_escape") for k, v in _LABEL.findall(m["labels"] or "")}
        value = m["value"]
        samples.append(Sample(m["name"], labels, math.inf if value == "+Inf" else float(value)))
    return samples


@dataclass(frozen=True)
class SpecDecodeCounters:
    drafts: float = 0.0
    draft_tokens: float = 0.0
    accepted: float = 0.0
    accepted_per_pos: dict[int, float] = field(default_factory=dict)

    @classmethod
    def from_samples(cls, samples: list[Sample], model_name: str | None = None) -> SpecDecodeCounters:
        totals = {DRAFTS: 0.0, DRAFT_TOKENS: 0.0, ACCEPTED: 0.0}
        per_pos: dict[int, float] = {}
        for s in samples:
            if model_name is not None and s.labels.get("model_name", model_name) != model_name:
                continue
            name = s.name[: -len("_total")] if s.name.endswith("_total") else s.name
            if name in totals:
                totals[name] += s.value
            elif name == ACCEPTED_PER_POS:
                pos = int(s.labels.get("position", "0"))
                per_pos[pos] = per_pos.get(pos, 0.0) + s.value
        return cls(totals[DRAFTS], totals[DRAFT_TOKENS], totals[ACCEPTED], per_pos)

    @classmethod
    def parse(cls, text: str, model_name: str | None = None) -> SpecDecodeCounters:
        return cls.from_samples(parse_prometheus(text), model_name)

    def __sub__(self, before: SpecDecodeCounters) -> SpecDecodeCounters:
        positions = set(self.accepted_per_pos) | set(before.accepted_per_pos)
        return SpecDecodeCounters(
            self.drafts - before.drafts,
            self.draft_tokens - before.draft_tokens,
            self.accepted - before.accepted,
            {p: self.accepted_per_pos.get(p, 0.0) - before.accepted_per_pos.get(p, 0.0) for p in sorted(positions)},
        )

    def acceptance_counts(self, num_steps: int | None = None) -> AcceptanceCounts:
        k = num_steps or (max(self.accepted_per_pos) + 1 if self.accepted_per_pos else 0)
        if k == 0 and self.drafts:
            k = round(self.draft_tokens / self.drafts)
        per_pos = [round(self.accepted_per_pos.get(i, 0.0)) for i in range(k)]
        return AcceptanceCounts(k, round(self.drafts), per_pos)

    @property
    def acceptance_length(self) -> float:
        """vLLM's "Mean acceptance length" = 1 + accepted / drafts."""
        return 1.0 + self.accepted / self.drafts if self.drafts else 1.0


def server_root(endpoint: str) -> str:
    """`http://host:8000/v1` or `http://host:8000` -> `http://host:8000` (/metrics lives at the root)."""
    root = endpoint.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


@dataclass
class VllmEndpoint:
    endpoint: str
    timeout: float = 600.0

    @property
    def root(self) -> str:
        return server_root(self.endpoint)

    def _get(self, path: str) -> str:
        import httpx

        url = self.root + path
        try:
            response = httpx.get(url, timeout=self.timeout)
        except httpx.HTTPError as exc:
            raise ServerError(f"cannot reach vLLM at {url}: {exc}. Is `vllm serve` running?") from exc
        if response.status_code != 200:
            raise ServerError(f"GET {url} answered HTTP {response.status_code}: {response.text[:200]}")
        return response.text

    def model_id(self) -> str:
        try:
            return json.loads(self._get("/v1/models"))["data"][0]["id"]
        except (KeyError, IndexError, json.JSONDecodeError) as exc:
            raise ServerError(f"{self.root}/v1/models: unexpected answer ({exc!r}).") from exc

    def counters(self, model_name: str | None = None) -> SpecDecodeCounters:
        text = self._get("/metrics")
        counters = SpecDecodeCounters.parse(text, model_name)
        if DRAFTS not in text:
            raise ServerError(
                f"{self.root}/metrics has no {DRAFTS} counter: the server is not speculating. Start it with "
                '--speculative-config \'{"method":"mtp","num_speculative_tokens":K}\'.'
            )
        return counters

    def complete(self, model: str, prompt: Prompt, max_tokens: int, temperature: float, chat: bool) -> int:
        """One request; returns the number of generated tokens (from `usage`)."""
        import httpx

        body: dict = {"model": model, "max_tokens": max_tokens, "temperature": temperature}
        if chat:
            path, body["messages"] = "/v1/chat/completions", chat_messages(prompt)
        else:
            path = "/v1/completions"
            body["prompt"] = prompt.token_ids if prompt.token_ids is not None else prompt.text
        url = self.root + path
        try:
            response = httpx.post(url, json=body, timeout=self.timeout)
        except httpx.HTTPError as exc:
            raise ServerError(f"POST {url} failed for prompt {prompt.prompt_id}: {exc}") from exc
        if response.status_code != 200:
            raise ServerError(
                f"POST {url} (prompt {prompt.prompt_id}) answered HTTP {response.status_code}: {response.text[:300]}"
            )
        return int(response.json().get("usage", {}).get("completion_tokens", 0))


@dataclass(frozen=True)
class VllmRun:
    counters: SpecDecodeCounters  # after - before
    model: str
    requests: int
    completion_tokens: int
    seconds: float


def run_vllm(
    endpoint: VllmEndpoint,
    prompts: list[Prompt],
    max_tokens: int = 256,
    temperature: float = 0.0,
    concurrency: int = 8,
    chat: bool = False,
    model: str | None = None,
) -> VllmRun:
    """Send every prompt, scraping the counters before and after. Other traffic on the server pollutes the diff."""
    if chat and any(p.text is None for p in prompts):
        raise DataError("--chat needs text prompts; token-id prompts go to /v1/completions.")
    model = model or endpoint.model_id()
    before = endpoint.counters(model)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        tokens = list(pool.map(lambda p: endpoint.complete(model, p, max_tokens, temperature, chat), prompts))
    seconds = time.perf_counter() - start
    # vLLM updates its counters when the engine logs stats; poll briefly until they stop moving.
    after = endpoint.counters(model)
    for _ in range(20):
        time.sleep(0.25)
        again = endpoint.counters(model)
        if again == after:
            break
        after = again
    return VllmRun(after - before, model, len(prompts), sum(tokens), seconds)


def vllm_serve_command(stitched_dir: str | Path, num_speculative_tokens: int, extra: list[str] | None = None) -> str:
    """The serving command for a stitched verifier (docs/contracts.md, "Commands and flags", step 6).

    The tutorial's command turns chunked prefill off; vLLM then refuses to start a hybrid verifier (Qwen3.5,
    Qwen3-Next: "Chunked prefill is required for mamba cache mode 'align'") unless prefix caching is off too, so
    both are off. A folder without tokenizer files gets the flags that serve it to token-id prompts.
    """
    from mtptune.serving.vllm_command import tokenizer_free_flags

    spec = json.dumps({"method": "mtp", "num_speculative_tokens": num_speculative_tokens}, separators=(",", ":"))
    extra = list(extra or [])
    parts = [
        "vllm",
        "serve",
        str(stitched_dir),
        "--speculative-config",
        spec,
        "--no-enable-chunked-prefill",
        "--no-enable-prefix-caching",
        *tokenizer_free_flags(str(stitched_dir), extra),
        *extra,
    ]
    return shlex.join(parts)
