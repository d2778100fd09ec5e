"""Session fixtures: one tiny verifier and its trained / random heads for every evaluation test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from mtptune.checkpoint.head_checkpoint import save_head_checkpoint
from mtptune.checkpoint.verifier import Verifier
from mtptune.evaluation.verifier_forward import VerifierForward
from mtptune.modeling.load import head_config_for, load_head
from mtptune.testing.tiny import TinySpec, write_tiny_verifier

from .trained_tiny import NEW_TOKENS, NUM_PROMPTS, NUM_STEPS, PROMPT_LEN, TinySetup, greedy_rows, train_head


@pytest.fixture(scope="package", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and spinning OpenMP threads on a busy 2-core box cost ~10x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> TinySetup:
    root = tmp_path_factory.mktemp("evaluation")
    verifier_dir = write_tiny_verifier(root / "verifier", TinySpec(seed=3))
    verifier = Verifier.open(str(verifier_dir))
    forward = VerifierForward.load(verifier)
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 990, (PROMPT_LEN,), generator=g).tolist() for _ in range(NUM_PROMPTS)]
    rows = greedy_rows(forward, prompts, NEW_TOKENS)
    # Trained on the very continuations it is evaluated on: "trained to be right", so acceptance is high and
    # offline and generated AL can be compared with little noise.
    head = train_head(verifier_dir, forward, rows)
    config = head_config_for(verifier, num_speculative_steps=NUM_STEPS)
    trained = save_head_checkpoint(root / "trained_head", config, head.state_dict())
    native, _, _ = load_head(verifier_dir)
    random_head = save_head_checkpoint(root / "random_head", config, native.state_dict())
    return TinySetup(verifier_dir, trained, random_head, forward, prompts, rows)
