"""Exact masks on hand-checked conversations: the assistant's tokens incl. its end-of-turn token, nothing else."""

from __future__ import annotations

import copy

import pytest

from mtptune.data.chat_render import ChatRenderer, parse_conversation
from mtptune.data.token_rows import Dropped

from .conftest import supervised

SMOL_PROMPT = [1, 9690, 198, 67, 2, 198, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198]  # system S, user Hi, asst
SMOL_ANSWER = [19556, 665, 2]  # "Hello", " there", "<|im_end|>"
NEWLINE = 198


def test_smollm2_single_turn_mask_is_exactly_the_answer_and_im_end(smollm2):
    conv = parse_conversation(
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there"},
            ]
        }
    )
    [row] = ChatRenderer(smollm2).render(conv).rows
    assert row.input_ids == [*SMOL_PROMPT, *SMOL_ANSWER, NEWLINE]
    assert row.loss_mask == [0] * len(SMOL_PROMPT) + [1, 1, 1] + [0]  # the template's trailing "\n" is not generated


def test_sharegpt_roles_and_both_row_modes_on_a_two_turn_conversation(smollm2):
    data = {
        "conversations": [
            {"from": "system", "value": "S"},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello there"},
            {"from": "human", "value": "Hi"},
            {"from": "gpt", "value": "Hello there"},
        ]
    }
    conv = parse_conversation(data)
    first, second = ChatRenderer(smollm2, "turn").render(conv).rows
    assert first.input_ids == [*SMOL_PROMPT, *SMOL_ANSWER, NEWLINE]
    turn2_prompt = [*SMOL_PROMPT, *SMOL_ANSWER, NEWLINE, 1, 4093, 198, 26843, 2, 198, 1, 520, 9531, 198]
    assert second.input_ids == [*turn2_prompt, *SMOL_ANSWER, NEWLINE]
    assert second.loss_mask == [0] * len(turn2_prompt) + [1, 1, 1, 0]  # earlier answer is context only

    rendered = ChatRenderer(smollm2).render(conv)  # the default: one row per conversation
    assert (rendered.layout, rendered.split) == ("conversation", None)
    [whole] = rendered.rows
    assert whole.input_ids == second.input_ids  # the last per-turn row's ids
    expected = [0] * len(SMOL_PROMPT) + [1, 1, 1, 0] + [0] * 10 + [1, 1, 1, 0]
    assert whole.loss_mask == expected
    assert whole.loss_mask == [a | b for a, b in zip(first.loss_mask + [0] * 14, second.loss_mask)]  # the union
    assert supervised(whole) == SMOL_ANSWER * 2


def test_qwen3_5_reasoning_is_supervised_after_the_think_opened_by_the_prompt(qwen):
    conv = parse_conversation(
        {
            "messages": [
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there", "reasoning_content": "greet them"},
            ]
        }
    )
    [row] = ChatRenderer(qwen).render(conv).rows
    prompt = qwen.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n", add_special_tokens=False)
    answer = qwen.encode("greet them\n</think>\n\nHello there<|im_end|>", add_special_tokens=False)
    assert prompt[-2:] == [248068, qwen.encode("\n", add_special_tokens=False)[0]]
    assert answer[-1] == 248046 and 248069 in answer
    assert row.input_ids == prompt + answer + qwen.encode("\n", add_special_tokens=False)
    assert row.loss_mask == [0] * len(prompt) + [1] * len(answer) + [0]


def test_qwen3_5_answer_without_reasoning_sits_after_the_closed_empty_think_block(qwen):
    conv = parse_conversation({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]})
    [row] = ChatRenderer(qwen).render(conv).rows
    assert qwen.decode(supervised(row)) == "Yo<|im_end|>"
    assert qwen.decode(row.input_ids).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nYo<|im_end|>\n")


# Qwen3.5 ids, checked by hand (`qwen.decode([i])`): <|im_start|> user \n Hi <|im_end|> \n <|im_start|> assistant \n
QWEN_PROMPT = [248045, 846, 198, 12675, 248046, 198, 248045, 74455, 198]
THINK_OPEN, THINK_CLOSE, NL, NLNL, IM_END = 248068, 248069, 198, 271, 248046
OK, YO = 547, 62535  # "ok", "Yo"
REASONING_FORMS = {
    "reasoning_content": {"content": "Yo", "reasoning_content": "ok"},
    "vllm_reasoning_field": {"content": "Yo", "reasoning": "ok"},
    "inline_think_block": {"content": "<think>\nok\n</think>\n\nYo"},
    "inline_after_opened_think": {"content": "ok\n</think>\n\nYo"},  # the prompt held `<think>\n`
}


@pytest.mark.parametrize("form", sorted(REASONING_FORMS))
def test_qwen3_5_reasoning_in_every_form_is_supervised_exactly(qwen, form):
    answer = {"role": "assistant", **REASONING_FORMS[form]}
    renderer = ChatRenderer(qwen)
    [row] = renderer.render(parse_conversation({"messages": [{"role": "user", "content": "Hi"}, answer]})).rows
    # prompt ... assistant \n <think> \n | ok \n </think> \n\n Yo <|im_end|> | \n
    assert row.input_ids == [*QWEN_PROMPT, THINK_OPEN, NL, OK, NL, THINK_CLOSE, NLNL, YO, IM_END, NL]
    assert row.loss_mask == [0] * 11 + [1] * 6 + [0]
    assert renderer.notes.counts == {}


def test_qwen3_5_empty_inline_think_block_is_an_answer_with_thinking_off(qwen):
    answer = {"role": "assistant", "content": "<think>\n\n</think>\n\nYo"}
    [row] = (
        ChatRenderer(qwen).render(parse_conversation({"messages": [{"role": "user", "content": "Hi"}, answer]})).rows
    )
    # the thinking-off prompt holds the closed empty block; the model wrote only the answer
    assert row.input_ids == [*QWEN_PROMPT, THINK_OPEN, NLNL, THINK_CLOSE, NLNL, YO, IM_END, NL]
    assert row.loss_mask == [0] * 13 + [1, 1, 0]


def test_qwen3_5_multi_turn_inline_reasoning_follows_the_templates_history(qwen):
    data = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "<think>\nok\n</think>\n\nYo"},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "ok\n</think>\n\nYo"},
        ]
    }
    first, second = ChatRenderer(qwen, "turn").render(parse_conversation(data)).rows
    turn = [THINK_OPEN, NL, OK, NL, THINK_CLOSE, NLNL, YO, IM_END, NL]
    assert first.input_ids == [*QWEN_PROMPT, *turn]
    # history: the first answer without its reasoning (Qwen drops reasoning before the last user message)
    history = [*QWEN_PROMPT, YO, IM_END, NL, *QWEN_PROMPT]
    assert second.input_ids == [*history, *turn]
    assert second.loss_mask == [0] * (len(history) + 2) + [1] * 6 + [0]
    assert qwen.decode(supervised(second)) == "ok\n</think>\n\nYo<|im_end|>"


def test_inline_reasoning_with_a_template_that_knows_no_reasoning_is_kept_verbatim(smollm2):
    renderer = ChatRenderer(smollm2)
    answer = {"role": "assistant", "content": "<think>\nok\n</think>\n\nYo"}
    [row] = renderer.render(parse_conversation({"messages": [{"role": "user", "content": "Hi"}, answer]})).rows
    assert smollm2.decode(supervised(row)) == "<think>\nok\n</think>\n\nYo<|im_end|>"  # what the model wrote
    assert renderer.notes.counts == {}


def test_qwen3_5_rewrites_history_so_the_conversation_falls_back_to_one_row_per_turn(qwen):
    data = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "A1", "reasoning_content": "r1"},
            {"role": "user", "content": "Q2"},
            {"role": "assistant", "content": "A2", "reasoning_content": "r2"},
        ]
    }
    conv = parse_conversation(data)
    rendered = ChatRenderer(qwen, "conversation").render(conv)
    assert rendered.layout == "turn" and "assistant message 1 renders differently" in rendered.split
    assert rendered.rows == ChatRenderer(qwen, "turn").render(conv).rows
    first, second = rendered.rows
    assert qwen.decode(supervised(first)) == "r1\n</think>\n\nA1<|im_end|>"
    assert qwen.decode(supervised(second)) == "r2\n</think>\n\nA2<|im_end|>"
    assert "r1" not in qwen.decode(second.input_ids)  # Qwen drops earlier reasoning from history


def test_qwen3_5_tool_calls_are_rendered_and_supervised(qwen):
    data = {
        "tools": [{"type": "function", "function": {"name": "add", "parameters": {}}}],
        "messages": [
            {"role": "user", "content": "1+2?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 1, "b": 2}}}],
            },
            {"role": "tool", "content": "3"},
            {"role": "assistant", "content": "3"},
        ],
    }
    renderer = ChatRenderer(qwen, "turn")
    first, second = renderer.render(parse_conversation(data)).rows
    [whole] = ChatRenderer(qwen).render(parse_conversation(data)).rows  # the tool turn does not rewrite history
    assert whole.input_ids == second.input_ids and supervised(whole) == supervised(first) + supervised(second)
    text = qwen.decode(supervised(first))
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call><|im_end|>' in text
    assert "<tool_response>\n3\n</tool_response>" in qwen.decode(second.input_ids)
    assert renderer.notes.counts == {}


def test_template_without_reasoning_support_keeps_the_row_and_notes_it(smollm2):
    renderer = ChatRenderer(smollm2)
    conv = parse_conversation(
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "A", "reasoning": "r"}]}
    )
    assert len(renderer.render(conv).rows) == 1
    assert renderer.notes.counts == {"reasoning_dropped_by_template": 1}


BAD_TEMPLATES = {
    # the generation prompt says "assistant\n" but answers render as "assistant: ..."
    "prompt_differs": "{% for m in messages %}<|im_start|>{{ m.role }}{% if m.role == 'assistant' %}: "
    "{% else %}\n{% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    # earlier turns change once later ones follow (a turn counter of the whole conversation)
    "history_rewritten": "{% for m in messages %}<|im_start|>{{ m.role }} {{ messages|length }}\n{{ m.content }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {{ messages|length + 1 }}\n{% endif %}",
}


TWO_TURNS = {
    "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "A"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "B"},
    ]
}


@pytest.mark.parametrize("name", sorted(BAD_TEMPLATES))
def test_prefix_stability_check_catches_a_bad_template(smollm2, name):
    tok = copy.copy(smollm2)
    tok.chat_template = BAD_TEMPLATES[name]
    result = ChatRenderer(tok).render(parse_conversation(TWO_TURNS))
    assert isinstance(result, Dropped) and result.reason == "not_prefix_stable"


# Like Qwen's reasoning: answers before the last user message are shown differently (here: not at all).
HIDES_EARLIER_ANSWERS = (
    "{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}"
    "{% endif %}{% endfor %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and "
    "loop.index0 < ns.last %}(earlier){% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_a_template_that_rewrites_history_splits_the_conversation_into_exact_turn_rows(smollm2):
    tok = copy.copy(smollm2)
    tok.chat_template = HIDES_EARLIER_ANSWERS
    rendered = ChatRenderer(tok).render(parse_conversation(TWO_TURNS))
    assert rendered.layout == "turn" and "assistant message 1 renders differently" in rendered.split
    first, second = rendered.rows
    # each turn row holds what the model saw when it wrote that turn
    assert tok.decode(first.input_ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nA<|im_end|>\n"
    assert tok.decode(second.input_ids).startswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n(earlier)")
    assert tok.decode(supervised(first)) == "A<|im_end|>" and tok.decode(supervised(second)) == "B<|im_end|>"


def test_boundary_token_merge_is_caught(smollm2):
    # The prompt ends in "Hel" and the answer starts "Hello": as text it is a prefix, as tokens it is not.
    tok = copy.copy(smollm2)
    tok.chat_template = "{% for m in messages %}{{ m.content }}{% endfor %}{% if add_generation_prompt %}Hel{% endif %}"
    conv = parse_conversation(
        {"messages": [{"role": "user", "content": "Q:"}, {"role": "assistant", "content": "Hello there"}]}
    )
    result = ChatRenderer(tok).render(conv)
    assert isinstance(result, Dropped) and result.reason == "not_prefix_stable" and "merge" in result.detail


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"messages": [{"role": "wizard", "content": "x"}]}, "unknown_role"),
        ({"conversations": [{"from": "human"}]}, "missing_field"),
        ({"messages": [{"content": "x"}]}, "missing_field"),
        ({"messages": "hi"}, "bad_type"),
        ({"messages": []}, "empty_conversation"),
    ],
)
def test_malformed_conversations_are_dropped_with_a_reason(data, reason):
    result = parse_conversation(data)
    assert isinstance(result, Dropped) and result.reason == reason


def test_conversation_without_assistant_is_dropped(smollm2):
    result = ChatRenderer(smollm2).render(parse_conversation({"messages": [{"role": "user", "content": "x"}]}))
    assert isinstance(result, Dropped) and result.reason == "no_assistant_turn"
