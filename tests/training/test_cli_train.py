"""`mtptune train` accepts the tutorial command verbatim and rejects or flags what does not apply to MTP."""

from __future__ import annotations

import logging
import shlex

import pytest

from mtptune.cli.main import build_parser, main
from mtptune.cli.train import build_config
from mtptune.errors import ConfigError

TUTORIAL = (
    "train --verifier-name-or-path {v} --data-path {d} --vllm-endpoint http://localhost:8000/v1 "
    "--save-path {s} --speculator-type mtp --num-speculative-steps 3 --target-layer-ids 4 "
    "--step-weight-beta 0.6 --epochs 3 --lr 1e-4 --total-seq-len 8192 --on-missing generate --on-generate delete"
)


def parse(command: str):
    return build_parser().parse_args(shlex.split(command))


def test_tutorial_command_builds_the_config(learnable, tmp_path):
    config = build_config(parse(tutorial(learnable, tmp_path)))
    assert config.hidden_states.endpoints == ("http://localhost:8000/v1",)
    assert (config.num_speculative_steps, config.epochs, config.optim.lr) == (3, 3, 1e-4)
    assert (config.hidden_states.on_missing, config.hidden_states.on_generate) == ("generate", "delete")
    assert config.data.total_seq_len == 8192 and config.loss.step_weight_beta == 0.6
    assert config.mtp_input_norm == "post_norm" and config.checkpoint.resume
    assert config.compile == "step"
    assert build_config(parse(f"{tutorial(learnable, tmp_path)} --no-compile")).compile == "none"
    assert build_config(parse(f"{tutorial(learnable, tmp_path)} --compile norms")).compile == "norms"


def tutorial(learnable, tmp_path) -> str:
    return TUTORIAL.format(v=learnable.verifier, d=learnable.data, s=tmp_path / "ckpt")


def test_conflicts_are_config_errors(learnable, tmp_path):
    base = f"train --verifier-name-or-path {learnable.verifier} --data-path {learnable.data} --save-path {tmp_path}"
    with pytest.raises(ConfigError, match="speculator-type"):
        build_config(parse(base + " --speculator-type eagle3"))
    with pytest.raises(ConfigError, match="--vllm-endpoint"):
        build_config(parse(base))  # --on-missing generate without a server
    with pytest.raises(ConfigError, match="--step-weights has 2 values"):
        build_config(parse(base + " --on-missing raise --step-weights 1,0"))
    with pytest.raises(ConfigError, match="--on-generate cache"):
        build_config(parse(base + " --on-missing raise --on-generate cache"))
    with pytest.raises(ConfigError, match="--loss-kernel liger computes cross-entropy only"):
        build_config(parse(base + " --on-missing raise --loss kl --loss-kernel liger"))


def test_inert_flags_warn_loudly(learnable, tmp_path, caplog):
    command = (
        f"train --verifier-name-or-path {learnable.verifier} --data-path {learnable.data} --save-path {tmp_path} "
        "--on-missing raise --target-layer-ids 2 --muon-lr 0.01 --step-weights 1,0,0"
    )
    with caplog.at_level(logging.WARNING):
        config = build_config(parse(command))
    assert "--muon-lr applies" in caplog.text
    assert config.loss.step_weights == (1.0, 0.0, 0.0) and config.optim.name == "adamw"
    muon = build_config(parse(command.replace("--muon-lr", "--optimizer muon --muon-lr")))
    assert muon.optim.name == "muon" and muon.optim.muon_lr == 0.01


def test_cli_trains_offline_and_prints_before_after(learnable, tmp_path, capsys):
    command = (
        f"train --verifier-name-or-path {learnable.verifier} --data-path {learnable.data} --save-path {tmp_path / 'c'} "
        "--on-missing raise --epochs 1 --max-rows 40 --total-seq-len 256 --lr 3e-3 --no-progress"
    )
    assert main(shlex.split(command)) == 0
    out = capsys.readouterr().out
    assert "validation tau_sim before" in out and "checkpoint_best" in out
    assert main(shlex.split(command.replace("--on-missing raise", "--on-missing generate"))) == 2


def test_a_bare_command_builds_exactly_the_default_config(learnable, tmp_path):
    """One default per field: `mtptune train` with only the required flags gives the config classes' defaults,
    field for field (a CLI default that drifts from its dataclass default fails here)."""
    from dataclasses import replace

    from mtptune.training.config import CheckpointConfig, DataConfig, HiddenStatesConfig, TrainConfig

    args = parse(
        f"train --verifier-name-or-path {learnable.verifier} --data-path {learnable.data} --save-path {tmp_path} "
        "--vllm-endpoint http://localhost:8000/v1"
    )
    args.api_key = None  # the CLI also reads OPENAI_API_KEY from the environment
    built = replace(build_config(args), command=())
    expected = TrainConfig(
        verifier=str(learnable.verifier),
        data=DataConfig(str(learnable.data)),
        checkpoint=CheckpointConfig(str(tmp_path)),
        hidden_states=HiddenStatesConfig(endpoints=("http://localhost:8000/v1",)),
    )
    assert built.to_dict() == expected.to_dict()


def test_allowed_values_come_from_the_config_types():
    from typing import get_args

    from mtptune.training.config import LossKind, OnMissing, SchedulerKind

    actions = {a.dest: a for a in build_parser()._subparsers._group_actions[0].choices["train"]._actions}  # type: ignore[union-attr]
    assert tuple(actions["loss"].choices) == get_args(LossKind)
    assert tuple(actions["on_missing"].choices) == get_args(OnMissing)
    assert tuple(actions["scheduler"].choices) == get_args(SchedulerKind)
