"""A word-level tokenizer for the tiny verifiers (`testing/tiny.py`, vocabulary 1000): token `wK` has id K and
`</s>` (id 999) is EOS, with a chat template. Enough for text prompts, detokenisation and chat requests in tests."""

from __future__ import annotations

from pathlib import Path

VOCAB = 1000
EOS = VOCAB - 1
CHAT_TEMPLATE = (
    "{% for m in messages %}w1 {{ m['content'] }} w2 {% endfor %}{% if add_generation_prompt %}w3{% endif %}"
)


def write_word_tokenizer(model_dir: Path) -> None:
    """Save the tokenizer (and its chat template) into `model_dir`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB - 1)} | {"</s>": EOS}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="w0", pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(model_dir)
