"""Checkpoint snapshot micro-benchmark (GPU): how long the trainer stops at an epoch end to copy a Qwen3.5-9B-shaped
head's checkpoint (bf16/fp32 weights, fp32 master weights, AdamW state) off the GPU, and how long writing the folder
takes. Baseline in the same run: pageable per-tensor copies plus a master-weights clone (the snapshot before page-
locked copies). Prints ONE JSON line.

    python benchmarks/checkpoint_snapshot.py [--repeats 3] [--write-to /tmp/mtptune-snapshot-bench]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Qwen3_5TextConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from head_step import QWEN35_9B

from mtptune.checkpoint.head_checkpoint import HeadConfig
from mtptune.families import family_by_name
from mtptune.modeling.head import MtpHead
from mtptune.training.checkpointing import TrainingState, rng_state, snapshot, write_snapshot


def pageable_snapshot(head: MtpHead, optimizer: torch.optim.Optimizer) -> dict:
    """The baseline: what the trainer did before (blocking pageable copies, master weights cloned once more)."""

    def host(value):
        if isinstance(value, torch.Tensor):
            return value.detach().to("cpu", copy=True)
        if isinstance(value, dict):
            return {k: host(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(host(v) for v in value)
        return value

    head_state = {k: v.detach().to("cpu", copy=True) for k, v in head.state_dict().items()}
    return {
        "head": head_state,
        "master": {k: v.float().clone() for k, v in head_state.items()},
        "optimizer": host(optimizer.state_dict()),
        "rng": rng_state(),
    }


def sequential_write(folder: Path, snap) -> None:
    """The baseline write: the same files one after another (what save_head_checkpoint did before)."""
    folder.mkdir(parents=True, exist_ok=True)
    bf16 = {f"mtp.{k}": v.to(torch.bfloat16).contiguous() for k, v in snap.head_state.items()}
    save_file(bf16, folder / "model.safetensors")
    for name, obj in snap.extra.items():
        if name.endswith(".json"):
            (folder / name).write_text(json.dumps(obj))
        else:
            torch.save(obj, folder / name)


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return round(time.perf_counter() - start, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cpu only checks that the script runs")
    parser.add_argument("--write-to", default="/tmp/mtptune-snapshot-bench", help="folder for the write timing")
    args = parser.parse_args()
    config = Qwen3_5TextConfig(**QWEN35_9B)
    family = family_by_name("qwen3_5")
    with torch.device(args.device):
        head = MtpHead(family, config).float()
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-5, fused=args.device != "cpu")
    for p in head.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()  # creates the AdamW state a real epoch end holds
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = TrainingState(epoch=1, local_step=0, global_step=1)
    nbytes = sum(p.numel() * p.element_size() for p in head.state_dict().values())
    nbytes += sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values())

    baseline = [timed(lambda: pageable_snapshot(head, optimizer)) for _ in range(args.repeats)]
    ours, holder = [], {}
    for _ in range(args.repeats):
        holder.clear()  # the trainer drops a snapshot once written: its page-locked blocks go back to the cache
        ours.append(timed(lambda: holder.setdefault("snap", snapshot(head, optimizer, scheduler, state, None))))
    snap = holder["snap"]
    folder = Path(args.write_to)
    head_config = HeadConfig("qwen3_5", "bench", ["Qwen3_5ForConditionalGeneration"], "qwen3_5", 3, config.to_dict())
    start = time.perf_counter()
    sequential_write(folder, snap)
    sequential_s = round(time.perf_counter() - start, 3)
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    write_snapshot(folder, head_config, snap)
    write_s = round(time.perf_counter() - start, 3)
    shutil.rmtree(folder, ignore_errors=True)
    result = {
        "benchmark": "checkpoint_snapshot",
        "device": torch.cuda.get_device_name(0) if args.device != "cpu" else "cpu",
        "torch": torch.__version__,
        "snapshot_gb": round(nbytes / 1e9, 2),
        "baseline_pageable_s": baseline,
        "pinned_s": ours,
        "speedup_steady": round(min(baseline) / min(ours[1:] or ours), 2),
        "baseline_sequential_write_s": sequential_s,
        "write_folder_s": write_s,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
