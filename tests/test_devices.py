"""Device flags: a device this machine lacks is an error naming the flag, from every command that takes one; a 16-bit
model on a CPU that would emulate its matmuls is warned about."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from mtptune.cli.main import main
from mtptune.devices import resolve_device, warn_if_slow_cpu_dtype
from mtptune.errors import ConfigError


def test_names_the_flag_for_a_device_that_is_not_there_or_not_a_device() -> None:
    with pytest.raises(ConfigError, match=r"--validate-device 'gpu0' is not a device"):
        resolve_device("gpu0", "--validate-device")
    with pytest.raises(ConfigError, match=r"--device cuda:99"):
        resolve_device("cuda:99")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the local rank picks the GPU")
def test_the_local_rank_picks_the_gpu_of_auto_and_bare_cuda() -> None:
    assert resolve_device("auto", local_rank=0) == resolve_device("cuda", local_rank=0) == torch.device("cuda", 0)


@pytest.mark.parametrize(
    "command",
    [
        "convert {verifier} --output-path {out} --validate-device cuda:99",
        "serve {verifier} --engine builtin --device cuda:99",
        "evaluate offline --head {verifier} --data {out} --device cuda:99",
        "evaluate generate --head {verifier} --prompts gsm8k --device cuda:99",
        "train --verifier-name-or-path {verifier} --data-path {out} --save-path {out}/ckpt --colocated --device cuda:99",
    ],
)
def test_every_command_refuses_a_missing_device_with_exit_2(command, tiny_verifier: Path, tmp_path, capsys) -> None:
    args = command.format(verifier=tiny_verifier, out=tmp_path).split()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "cuda:99" in err and "Traceback" not in err, err


@pytest.mark.parametrize("native", [False, True])
def test_16_bit_verifier_on_a_cpu_without_native_matmuls_is_warned_about(monkeypatch, caplog, native):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with caplog.at_level(logging.WARNING, logger="mtptune.devices"):
        warn_if_slow_cpu_dtype(torch.device("cpu"), torch.bfloat16, "the verifier")
        warn_if_slow_cpu_dtype(torch.device("cpu"), torch.float32, "the verifier")  # never: fp32 is fast anywhere
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == (0 if native else 1)
    if warned:
        assert "bfloat16" in warned[0] and "--dtype float32" in warned[0]
