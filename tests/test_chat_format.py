"""Tool and reasoning formats: rendering into prompts, and parsing streamed replies."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from semantic.chat_format import HERMES, HERMES_THINK, TextPart, ThinkingPart, ToolCallPart, detect_format
from semantic.mlx_model import HFChatTokenizer
from semantic.model import ChatMessage, ToolCall, ToolSpec

TOOLS = [ToolSpec("Bash", "Run a shell command.", {"type": "object", "properties": {"command": {"type": "string"}}})]
CALL = '<tool_call>\n{"name": "Bash", "arguments": {"command": "ls"}}\n</tool_call>'


def parse(fmt, pieces, tools=TOOLS):
    p = fmt.parser(tools)
    out = [part for piece in pieces for part in p.feed(piece)] + p.finish()
    merged = []
    for part in out:  # adjacent text/thinking pieces are one block
        if merged and type(part) is type(merged[-1]) and not isinstance(part, ToolCallPart):
            merged[-1] = type(part)(merged[-1].text + part.text)
        else:
            merged.append(part)
    return merged


def shape(parts):
    return [(type(p).__name__, p.text if not isinstance(p, ToolCallPart) else (p.call.name, json.loads(p.call.arguments))) for p in parts]


def test_a_call_between_text_and_whitespace():
    parts = parse(HERMES, [f"Listing.\n\n{CALL}\n"])
    assert shape(parts) == [("TextPart", "Listing."), ("ToolCallPart", ("Bash", {"command": "ls"}))]


def test_reasoning_then_text_then_two_calls():
    reply = f"<think>\n  Need files.\n</think>\n\nSure.\n{CALL}\n{CALL}"
    assert shape(parse(HERMES_THINK, [reply])) == [
        ("ThinkingPart", "Need files."),
        ("TextPart", "Sure."),
        ("ToolCallPart", ("Bash", {"command": "ls"})),
        ("ToolCallPart", ("Bash", {"command": "ls"})),
    ]


def test_what_does_not_parse_stays_text():
    assert shape(parse(HERMES, ["<tool_call>{broken</tool_call>"])) == [("TextPart", "<tool_call>{broken</tool_call>")]
    unknown = '<tool_call>{"name": "rm", "arguments": {}}</tool_call>'
    assert shape(parse(HERMES, [unknown])) == [("TextPart", unknown)]
    assert shape(parse(HERMES, [CALL], tools=[])) == [("TextPart", CALL)]  # no tools declared: no parsing
    assert shape(parse(HERMES, ["a <think>b</think>"])) == [("TextPart", "a <think>b</think>")]  # not a thinking family


def test_an_unclosed_call_at_the_end_is_parsed_if_complete():
    assert shape(parse(HERMES, ['<tool_call>{"name": "Bash", "arguments": {"command": "ls"}}'])) == [("ToolCallPart", ("Bash", {"command": "ls"}))]
    assert shape(parse(HERMES, ['<tool_call>{"name": "Bash", "argu'])) == [("TextPart", '<tool_call>{"name": "Bash", "argu')]


@given(st.lists(st.sampled_from(["Hi ", "<think>", "hmm", "</think>", "\n", CALL, "<tool", "_call>", "{", "x", "</tool_call>", " "]), max_size=12), st.data())
def test_chunking_never_changes_the_result(pieces, data):
    text = "".join(pieces)
    cuts = sorted(data.draw(st.sets(st.integers(0, len(text)), max_size=8)))
    chunks = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    assert shape(parse(HERMES_THINK, chunks)) == shape(parse(HERMES_THINK, [text]))


@given(st.text())
def test_plain_text_passes_through_unchanged(text):
    parts = parse(HERMES, [text], tools=[])
    assert "".join(p.text for p in parts) == text


def test_generic_rendering_of_tools_calls_and_results():
    messages = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "list files"),
        ChatMessage("assistant", "Sure.", tool_calls=(ToolCall("t1", "Bash", '{"command": "ls"}'),)),
        ChatMessage("tool", "a.txt", tool_call_id="t1", name="Bash"),
        ChatMessage("tool", "b.txt", tool_call_id="t2", name="Bash"),
        ChatMessage("user", "thanks"),
    ]
    out = HERMES.render(messages, TOOLS)
    assert [m.role for m in out] == ["system", "user", "assistant", "user", "user"]
    assert out[0].content.startswith("Be brief.\n\n# Tools\n") and '"name": "Bash"' in out[0].content
    assert out[2].content == f"Sure.\n{CALL}"
    assert out[3].content == "<tool_response>\na.txt\n</tool_response>\n<tool_response>\nb.txt\n</tool_response>"
    assert HERMES.render([ChatMessage("user", "hi")], TOOLS)[0].role == "system"  # a tools section even without a system prompt


class _FakeHF:
    """A tokenizer whose template handles tools natively (records what it was given)."""

    chat_template = "{% for m in messages %}{{ m.tool_calls }}{% endfor %}{{ tools }}"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize, tools=None):
        self.seen = (messages, tools)
        return json.dumps([messages, tools])

    def encode(self, text, add_special_tokens):
        return list(text.encode())


def test_templates_with_tool_support_get_tools_natively():
    hf = _FakeHF()
    tok = HFChatTokenizer(hf, [0])
    assert tok.native_tools
    call = ChatMessage("assistant", "", tool_calls=(ToolCall("t1", "Bash", '{"command": "ls"}'),))
    tok.encode_chat([ChatMessage("user", "x"), call, ChatMessage("tool", "ok", tool_call_id="t1", name="Bash")], TOOLS)
    messages, tools = hf.seen
    assert tools[0]["function"]["name"] == "Bash" and messages[1]["tool_calls"][0]["function"]["arguments"] == {"command": "ls"}
    assert messages[2] == {"role": "tool", "content": "ok", "tool_call_id": "t1", "name": "Bash"}


def test_the_embedded_models_template_gets_the_generic_format(smollm):
    tok = smollm.tokenizer
    assert not tok.native_tools and smollm.chat_format is HERMES
    text = tok.decode(tok.encode_chat([ChatMessage("user", "list files")], TOOLS))
    assert "<tools>" in text and '"name": "Bash"' in text and text.rstrip().endswith("assistant")
    prefilled = tok.decode(tok.encode_chat([ChatMessage("user", "What is 2+2?"), ChatMessage("assistant", "The answer is")]))
    assert prefilled.endswith("<|im_start|>assistant\nThe answer is")  # continued, not closed and restarted
    assert detect_format("... <think> ...") is HERMES_THINK and detect_format("") is HERMES
    assert isinstance(parse(HERMES, ["x"])[0], TextPart) and ThinkingPart("a").text == "a"
