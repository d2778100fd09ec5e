"""Runs inside `.venv-interop` (speculators 0.9.0 installed), never imported by the mtptune test process.

Usage: python speculators_side.py JOB.json. JOB is {"actions": [...], "results": PATH}; each action is executed
in order with speculators' own code and its outcome (or the error speculators raised) is recorded in PATH:
  forward:    MTPDraftModel.from_pretrained(checkpoint) -> fp32 forward on saved inputs -> logits per step (.pt)
  convert:    speculators.convert.entrypoints.convert_model(verifier, algorithm="mtp")
  train_step: from_pretrained(checkpoint) -> one AdamW step on the FastMTP loss -> saved by speculators'
              SingleGPUCheckpointer as epoch 0 (+ training_state.json as its trainer writes it)
  stitch:     speculators.cli.stitch.stitch(checkpoint, verifier, output)
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

import torch


def forward(action: dict) -> dict:
    from speculators.models.mtp import MTPDraftModel

    model = MTPDraftModel.from_pretrained(action["checkpoint"]).float().eval()
    inputs = torch.load(action["inputs"])
    with torch.no_grad():
        logits, _, _ = model(inputs["input_ids"], inputs["hidden_states"])
    torch.save([x.float() for x in logits], action["output"])
    params = dict(model.named_parameters())
    nan = sorted(k for k, v in params.items() if torch.isnan(v).any())
    return {
        "class": type(model).__name__,
        "num_speculative_steps": model.config.num_speculative_steps,
        "layer_config": type(model.config.transformer_layer_config).__name__,
        "nan_parameters": nan,
    }


def convert(action: dict) -> dict:
    from speculators.convert.entrypoints import convert_model

    convert_model(
        action["verifier"],
        verifier=action["verifier"],
        algorithm="mtp",
        output_path=action["output"],
        num_speculative_steps=action.get("steps", 3),
    )
    return {}


def train_step(action: dict) -> dict:
    from speculators.models.mtp import MTPDraftModel, compute_step_weights
    from speculators.train.checkpointer import SingleGPUCheckpointer

    model = MTPDraftModel.from_pretrained(action["checkpoint"]).float().train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    inputs = torch.load(action["inputs"])
    steps = model.config.num_speculative_steps
    _, loss, _ = model(
        inputs["input_ids"],
        inputs["hidden_states"],
        loss_mask=torch.ones_like(inputs["input_ids"]),
        step_weights=compute_step_weights(0.6, steps),
    )
    loss.backward()
    optimizer.step()
    checkpointer = SingleGPUCheckpointer(action["save_path"])
    checkpointer.save_checkpoint(model, optimizer, 0)
    state = {"epoch": 0, "local_step": 1, "global_step": 1}
    (Path(action["save_path"]) / "0" / "training_state.json").write_text(json.dumps(state))
    return {"loss": float(loss)}


def stitch(action: dict) -> dict:
    from speculators.cli.stitch import stitch as speculators_stitch

    speculators_stitch(Path(action["checkpoint"]), Path(action["verifier"]), Path(action["output"]))
    return {}


OPS = {"forward": forward, "convert": convert, "train_step": train_step, "stitch": stitch}


def main(job_path: str) -> int:
    job = json.loads(Path(job_path).read_text())
    results = []
    for action in job["actions"]:
        try:
            results.append({"ok": True, **OPS[action["op"]](action)})
        except Exception as exc:  # recorded: some speculators faults are what the tests check
            results.append({"ok": False, "error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()})
    Path(job["results"]).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
