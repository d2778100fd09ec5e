"""Multi-turn prompts (the second turn sees the verifier's own first answer) and `evaluate generate --workers`
(the same tokens, hence the same acceptance, from several processes as from one)."""

from __future__ import annotations

import json
from pathlib import Path

from mtptune.cli.main import main
from mtptune.evaluation.generation_run import Dialogue, run_generation
from mtptune.evaluation.result import EvaluationResult
from mtptune.evaluation.speculative import greedy_decode
from mtptune.modeling.load import load_head

from .trained_tiny import NUM_STEPS, TinySetup

FOLLOW_UP = [7, 8, 9, 10]  # the "user's" second turn, as token ids


def test_second_turn_is_conditioned_on_the_verifiers_own_first_answer(tiny: TinySetup) -> None:
    head, _, _ = load_head(tiny.trained_head, str(tiny.verifier_dir))
    seen: list[list[list[int]]] = []

    def render(prompt: list[int]):
        def turn(answers: list[list[int]]) -> list[int]:
            seen.append([list(a) for a in answers])
            return prompt + [t for a in answers for t in (*a, *FOLLOW_UP)]

        return turn

    prompts = tiny.eval_prompts[:2]
    dialogues = [Dialogue(f"c{i}", 2, render(p), i) for i, p in enumerate(prompts)]
    run = run_generation(tiny.forward, head, dialogues, 12, NUM_STEPS, stop_tokens=set())  # lossless: asserted
    assert (run.prompts, run.conversations, len(run.turn_accept_lengths)) == (4, 2, 2)
    assert sorted(run.accept_lengths) == sorted(run.turn_accept_lengths[0] + run.turn_accept_lengths[1])
    # Turn 2 of conversation 0 was rendered from turn 1's answer: the verifier's own greedy continuation.
    greedy, _ = greedy_decode(tiny.forward, prompts[0], 12, stop_tokens=set())
    assert seen[0] == [] and seen[1] == [greedy.tokens]
    assert run.generated_tokens == run.baseline_generated_tokens == 4 * 12


def test_workers_give_the_same_result_as_one_process(tiny: TinySetup, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in tiny.eval_prompts[:3]))
    common = ["evaluate", "generate", "--head", str(tiny.trained_head), "--verifier", str(tiny.verifier_dir)]
    common += ["--prompts", str(prompts), "--max-new-tokens", "10", "--temperature", "0.7", "--seed", "4"]
    common += ["--no-greedy-baseline", "--no-plot"]
    results = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        assert main([*common, "--workers", str(workers), "--output", str(out)]) == 0
        results[workers] = EvaluationResult.load(out)
    one, two = results[1], results[2]
    assert one.counts == two.counts and one.rows == two.rows == 3  # sampling is seeded per prompt, not per process
    assert one.generation.generated_tokens == two.generation.generated_tokens == 30
    assert not one.generation.greedy_baseline and one.generation.baseline_verifier_steps == 0
    assert one.generation.temperature == 0.7 and one.generation.seed == 4 and not one.generation.lossless_checked


def test_the_greedy_baseline_is_the_lossless_check_at_temperature_0(capsys) -> None:
    assert main(["evaluate", "generate", "--head", "h", "--no-greedy-baseline"]) == 2
    assert "--no-greedy-baseline needs --temperature > 0" in capsys.readouterr().err
