"""`mtptune evaluate`: a numeric flag out of its range is a usage error naming the flag, before any work (issue 22:
`--num-prompts -3` ran 5 prompts, the list sliced from its end)."""

from __future__ import annotations

import pytest

from mtptune.cli.main import build_parser, main

MODES = {
    "offline": ["evaluate", "offline", "--head", "h", "--data", "d"],
    "generate": ["evaluate", "generate", "--head", "h"],
    "vllm": ["evaluate", "vllm", "--endpoint", "http://127.0.0.1:9"],
}
BAD = [
    ("generate", "--num-prompts", "-3"), ("generate", "--num-prompts", "0"), ("vllm", "--num-prompts", "-1"),
    ("generate", "--max-new-tokens", "0"), ("generate", "--temperature", "-0.5"), ("generate", "--temperature", "inf"),
    ("generate", "--seed", "-1"), ("generate", "--seed", str(2**64)), ("generate", "--max-seconds", "0"),
    ("generate", "--tie-tolerance", "-1"), ("generate", "--num-steps", "0"), ("offline", "--num-steps", "-2"),
    ("offline", "--max-rows", "0"), ("vllm", "--max-tokens", "0"), ("vllm", "--temperature", "nan"),
    ("vllm", "--concurrency", "0"), ("vllm", "--num-steps", "0"), ("generate", "--num-prompts", "three"),
]  # fmt: skip


@pytest.mark.parametrize("mode, flag, value", BAD)
def test_out_of_range_numbers_are_usage_errors(mode, flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*MODES[mode], flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and value in err


def test_numbers_in_range_parse():
    args = build_parser().parse_args(
        [*MODES["generate"], "--num-prompts", "3", "--max-new-tokens", "1", "--temperature", "0", "--seed",
         str(2**64 - 1), "--max-seconds", "0.5", "--tie-tolerance", "0", "--num-steps", "1"]
    )  # fmt: skip
    assert (args.num_prompts, args.max_new_tokens, args.temperature, args.seed) == (3, 1, 0.0, 2**64 - 1)
    args = build_parser().parse_args(
        [*MODES["vllm"], "--max-tokens", "1", "--concurrency", "1", "--temperature", "0.7"]
    )
    assert (args.max_tokens, args.concurrency, args.temperature) == (1, 1, 0.7)
