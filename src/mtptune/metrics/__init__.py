"""Acceptance metrics shared by the trainer (validation) and the evaluator (docs/contracts.md,
"Acceptance metrics")."""

from mtptune.metrics.acceptance import AcceptanceCounts, step_weights

__all__ = ["AcceptanceCounts", "step_weights"]
