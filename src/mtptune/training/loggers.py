"""Metric sinks: always `metrics.jsonl` in the run folder; tensorboard / trackio / wandb on request.

The optional trackers are imported lazily, only when named in --logger, so none of them is a dependency.
Only rank 0 logs.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mtptune.checkpoint.files import json_line
from mtptune.errors import ConfigError

log = logging.getLogger(__name__)

KNOWN_LOGGERS = ("tensorboard", "trackio", "wandb")


class MetricsLogger:
    def __init__(
        self,
        run_dir: Path,
        loggers: tuple[str, ...],
        log_dir: Path,
        run_name: str,
        config: dict,
        enabled: bool = True,
    ):
        self.enabled = enabled
        self._sinks: list = []
        self._jsonl = None
        if not enabled:
            return
        unknown = [name for name in loggers if name not in KNOWN_LOGGERS]
        if unknown:
            raise ConfigError(f"--logger {unknown[0]!r} is not supported; choose from {', '.join(KNOWN_LOGGERS)}.")
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        # A run killed mid-write leaves a partial last line; start the resumed run's records on a fresh line.
        needs_newline = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
        self._jsonl = path.open("a")
        if needs_newline:
            self._jsonl.write("\n")
        for name in loggers:
            self._sinks.append(_open_sink(name, log_dir, run_name, config))

    def log(self, split: str, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"split": split, "step": step, "time": time.time(), **metrics}
        self._jsonl.write(json_line(record))  # a NaN loss is written null: the file stays JSON Lines
        self._jsonl.flush()
        prefixed = {f"{split}/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
        for sink in self._sinks:
            sink.log(prefixed, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        for sink in self._sinks:
            sink.close()
        self._sinks = []


def _open_sink(name: str, log_dir: Path, run_name: str, config: dict):
    try:
        if name == "tensorboard":
            return _TensorBoard(log_dir / run_name)
        if name == "trackio":
            return _Tracker(__import__("trackio"), run_name, config, log_dir)
        return _Tracker(__import__("wandb"), run_name, config, log_dir)
    except ImportError as exc:
        pkg = "tensorboard" if name == "tensorboard" else name
        raise ConfigError(f"--logger {name} needs the `{pkg}` package: pip install {pkg} ({exc}).") from exc


class _TensorBoard:
    def __init__(self, path: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(path))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class _Tracker:
    """trackio and wandb share the init / log / finish API."""

    def __init__(self, module, run_name: str, config: dict, log_dir: Path):
        self.module = module
        kwargs = {"project": "mtptune", "name": run_name, "config": config}
        if module.__name__ == "wandb":
            kwargs["dir"] = str(log_dir)
        self.run = module.init(**kwargs)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.module.log(metrics, step=step)

    def close(self) -> None:
        self.module.finish()
