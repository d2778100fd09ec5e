"""One evaluation result, whichever way it was measured; what reports write, read back and compare."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Literal

from mtptune.checkpoint.files import json_text
from mtptune.errors import DataError
from mtptune.metrics.acceptance import AcceptanceCounts

Method = Literal["offline", "generate", "vllm"]


@dataclass(frozen=True, kw_only=True)
class DecodingTotals:
    """What real speculative decoding of a prompt set adds up, beside plain greedy decoding of the same prompts."""

    prompts: int = 0  # prompts (turns) decoded (fewer than given when a time budget ran out)
    conversations: int = 0  # multi-turn prompts decoded (each of their turns counts in `prompts`); 0: not recorded
    generated_tokens: int = 0
    baseline_generated_tokens: int = 0
    verifier_steps: int = 0
    baseline_verifier_steps: int = 0
    seconds: float = 0.0
    baseline_seconds: float = 0.0
    numerical_ties: int = 0  # prompts whose comparison stopped at a greedy near-tie (see --tie-tolerance)
    batch_size: int = 1  # prompts decoded together per verifier forward (1: one at a time)

    def totals(self) -> dict:
        """Just these fields (not a subclass's), e.g. to build a `GenerationStats` from a run."""
        return {f.name: getattr(self, f.name) for f in fields(DecodingTotals)}


@dataclass(frozen=True, kw_only=True)
class GenerationStats(DecodingTotals):
    """Real speculative decoding against plain greedy decoding of the same prompts, in the same run: the totals and
    the settings they were measured with."""

    temperature: float
    lossless_checked: bool  # token-for-token equality with greedy decoding was asserted (temperature 0)
    greedy_baseline: bool = True  # False: sampled run without the greedy decoding (no baseline tokens/s)
    seed: int | None = None  # sampling seed (temperature > 0)
    max_new_tokens: int | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def baseline_tokens_per_s(self) -> float:
        return self.baseline_generated_tokens / self.baseline_seconds if self.baseline_seconds > 0 else 0.0

    @property
    def speedup(self) -> float:
        return self.tokens_per_s / self.baseline_tokens_per_s if self.baseline_tokens_per_s > 0 else 0.0


@dataclass(frozen=True)
class EvaluationResult:
    method: Method
    head: str  # what was evaluated: a head source, or the vLLM endpoint's model id
    verifier: str
    dataset: str
    counts: AcceptanceCounts
    rows: int = 0  # offline: documents; generate/vllm: prompts
    label_accuracy: list[float] | None = None  # offline: per-step top-1 accuracy against the dataset labels
    generation: GenerationStats | None = None
    draft_tokens: int | None = None  # vllm: vllm:spec_decode_num_draft_tokens
    by_turn: list[AcceptanceCounts] | None = None  # generate, multi-turn prompts: the counts of turn 1, 2, ...

    @property
    def num_steps(self) -> int:
        return self.counts.num_steps

    @property
    def acceptance_length(self) -> float:
        return self.counts.acceptance_length

    @property
    def draft_acceptance_rate(self) -> float | None:
        """A / draft tokens (vLLM's "Avg Draft acceptance rate"); with full-length drafts = (AL - 1) / K."""
        total = self.draft_tokens if self.draft_tokens is not None else self.counts.drafts * self.counts.num_steps
        return sum(self.counts.accepted_per_position) / total if total else None

    def to_json(self) -> dict:
        body = {f.name: getattr(self, f.name) for f in fields(self)}
        body["counts"] = self.counts.to_dict()
        body["by_turn"] = None if self.by_turn is None else [c.to_dict() for c in self.by_turn]
        body["generation"] = None
        if self.generation is not None:
            body["generation"] = asdict(self.generation) | {
                "tokens_per_s": self.generation.tokens_per_s,
                "baseline_tokens_per_s": self.generation.baseline_tokens_per_s,
                "speedup": self.generation.speedup,
            }
        body["acceptance_length"] = self.acceptance_length
        body["draft_acceptance_rate"] = self.draft_acceptance_rate
        return body

    @classmethod
    def from_json(cls, body: dict, source: str = "result") -> EvaluationResult:
        try:
            counts = _counts(body["counts"])
            by_turn = body.get("by_turn")
            gen = body.get("generation")
            generation = None
            if gen is not None:
                known = {f.name for f in fields(GenerationStats)}
                generation = GenerationStats(**{k: v for k, v in gen.items() if k in known})
            return cls(
                method=body["method"],
                head=body["head"],
                verifier=body["verifier"],
                dataset=body["dataset"],
                counts=counts,
                rows=body.get("rows", 0),
                label_accuracy=body.get("label_accuracy"),
                generation=generation,
                draft_tokens=body.get("draft_tokens"),
                by_turn=None if by_turn is None else [_counts(c) for c in by_turn],
            )
        except (KeyError, TypeError) as exc:
            raise DataError(f"{source}: not an mtptune evaluation result ({exc!r} missing or malformed).") from exc

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json_text(self.to_json()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> EvaluationResult:
        path = Path(path)
        if path.is_dir():
            path = path / RESULT_FILE
        try:
            body = json.loads(path.read_text())
        except FileNotFoundError as exc:
            raise DataError(f"{path}: no such evaluation result.") from exc
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}: not valid JSON: {exc}") from exc
        return cls.from_json(body, str(path))


RESULT_FILE = "result.json"


def _counts(c: dict) -> AcceptanceCounts:
    return AcceptanceCounts(c["num_steps"], c["drafts"], list(c["accepted_per_position"]))
