"""Where offline evaluation gets the verifier's hidden states: a direct transformers forward, or a
hidden-state server (the trainer's client). Both yield the post-norm h_t the drafter sees at serving time."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from mtptune.errors import ServerError
from mtptune.evaluation.token_rows import EvalRow
from mtptune.evaluation.verifier_forward import VerifierForward
from mtptune.modeling.head import MtpHead


class HiddenStateSource(Protocol):
    def iter_post_norm(self, rows: Iterable[EvalRow]) -> Iterator[tuple[EvalRow, torch.Tensor]]:
        """(row, h [T, H] post final norm) for every row, in order."""
        ...


@dataclass
class DirectForward:
    """Run the verifier itself; one row per forward (hybrid verifiers must be padded, never packed: contracts f)."""

    verifier: VerifierForward

    def iter_post_norm(self, rows: Iterable[EvalRow]) -> Iterator[tuple[EvalRow, torch.Tensor]]:
        for row in rows:
            yield row, self.verifier.hidden_states(torch.tensor(row.input_ids))


@dataclass
class ServerHiddenStates:
    """A hidden-state server: it returns the layer-N residual r_t (pre-norm, contracts b6); the head's copy of the
    verifier's final norm turns it into h_t (d4)."""

    endpoints: list[str]
    model_id: str | None
    head: MtpHead

    def iter_post_norm(self, rows: Iterable[EvalRow]) -> Iterator[tuple[EvalRow, torch.Tensor]]:
        try:
            from mtptune.serving.client import HiddenStatesClient  # type: ignore[import-not-found]
        except ImportError as exc:
            raise ServerError(
                "this mtptune build has no hidden-state client (mtptune.serving.client); evaluate with a direct "
                "forward instead (omit --server)."
            ) from exc
        by_id = {row.row_id: row for row in rows}
        items = [(row.row_id, row.input_ids) for row in by_id.values()]
        with HiddenStatesClient(
            self.endpoints, self.model_id, num_layers=1, hidden_size=self.head.hidden_size
        ) as client:
            for row_id, states in client.iter_fetch(items):
                if isinstance(states, Exception):
                    raise ServerError(f"hidden-state server failed on row {row_id}: {states}") from states
                row = by_id[row_id]
                if torch.as_tensor(states.token_ids).tolist() != row.input_ids:
                    raise ServerError(f"hidden-state server returned other token ids for row {row_id}.")
                residual = states.hidden_states[:, -1, :]  # [T, H], the last captured layer = N
                yield row, self.head.verifier_final_norm(residual.float()).to(self.head.fc.weight.dtype)
