"""Harmony: prompts render as the format's documentation shows them; completions split into reasoning and
content, prefix by prefix."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from models.gpt_oss.harmony import (SPECIAL_TOKENS, ChatOptions, parse_completion, parse_output, reasoning_parser,
                                    render_chat, render_prompt)
from runtime import LLM
from tests.runtime.forced_tools import check_forced_tool_calls
from tests.runtime.tool_stream import CharTokenizer, final_message, streamed_message

DATE = {"current_date": "2025-06-28"}
SYSTEM = ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
          "Knowledge cutoff: 2024-06\nCurrent date: 2025-06-28\n\nReasoning: {effort}\n\n"
          "# Valid channels: analysis, commentary, final. Channel must be included for every message.{tools}<|end|>")
TOOLS_NOTE = "\nCalls to these tools must go to the commentary channel: 'functions'."

WEATHER_TOOLS = [
    {"type": "function", "function": {"name": "get_location", "description": "Gets the location of the user."}},
    {"type": "function", "function": {
        "name": "get_current_weather", "description": "Gets the current weather in the provided location.",
        "parameters": {"type": "object", "required": ["location"], "properties": {
            "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
            "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}}}}},
    {"type": "function", "function": {
        "name": "get_multiple_weathers", "description": "Gets the current weather in the provided list of locations.",
        "parameters": {"type": "object", "required": ["locations"], "properties": {
            "locations": {"type": "array", "items": {"type": "string"},
                          "description": 'List of city and state, e.g. ["San Francisco, CA", "New York, NY"]'},
            "format": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"}}}}},
]
# the developer message of harmony's function-calling example (docs/format.md of openai/harmony)
WEATHER_DEVELOPER = (
    "<|start|>developer<|message|># Instructions\n\nUse a friendly tone.\n\n# Tools\n\n## functions\n\n"
    "namespace functions {\n\n"
    "// Gets the location of the user.\ntype get_location = () => any;\n\n"
    "// Gets the current weather in the provided location.\ntype get_current_weather = (_: {\n"
    "// The city and state, e.g. San Francisco, CA\nlocation: string,\n"
    'format?: "celsius" | "fahrenheit", // default: celsius\n}) => any;\n\n'
    "// Gets the current weather in the provided list of locations.\ntype get_multiple_weathers = (_: {\n"
    '// List of city and state, e.g. ["San Francisco, CA", "New York, NY"]\nlocations: string[],\n'
    'format?: "celsius" | "fahrenheit", // default: celsius\n}) => any;\n\n'
    "} // namespace functions<|end|>")


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt_oss):
    return AutoTokenizer.from_pretrained(tiny_gpt_oss)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# ---- rendering --------------------------------------------------------------------------------------


def test_renders_the_spec_prompt_with_the_system_prompt_as_developer_instructions():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"}]
    expected = (SYSTEM.format(effort="medium", tools="") +
                "<|start|>developer<|message|># Instructions\n\nBe brief.<|end|>"
                "<|start|>user<|message|>What is 2 + 2?<|end|><|start|>assistant")
    assert render_prompt(messages, ChatOptions(**DATE)) == expected


def test_renders_function_tools_as_in_the_harmony_docs():
    messages = [{"role": "system", "content": "Use a friendly tone."},
                {"role": "user", "content": "What is the weather like in SF?"}]
    expected = (SYSTEM.format(effort="high", tools=TOOLS_NOTE) + WEATHER_DEVELOPER +
                "<|start|>user<|message|>What is the weather like in SF?<|end|><|start|>assistant")
    assert render_prompt(messages, ChatOptions(reasoning_effort="high", tools=WEATHER_TOOLS, **DATE)) == expected


def test_keeps_the_analysis_behind_a_pending_tool_call_and_renders_its_result():
    messages = [
        {"role": "user", "content": "What is the weather like in SF?"},
        {"role": "assistant", "reasoning_content": "Need to use function get_weather.", "content": None,
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": '{"location":"San Francisco"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"sunny": True, "temperature": 20})},
    ]
    expected = ("<|start|>user<|message|>What is the weather like in SF?<|end|>"
                "<|start|>assistant<|channel|>analysis<|message|>Need to use function get_weather.<|end|>"
                "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
                '{"location":"San Francisco"}<|call|>'
                "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>"
                '{"sunny": true, "temperature": 20}<|end|><|start|>assistant')
    prompt = render_prompt(messages, ChatOptions(tools=WEATHER_TOOLS[1:2], **DATE))
    assert prompt.endswith(expected)


def test_drops_chain_of_thought_once_answered():
    messages = [{"role": "user", "content": "What is 2 + 2?"},
                {"role": "assistant", "reasoning_content": "Simple arithmetic.", "content": "2 + 2 = 4."},
                {"role": "user", "content": "What about 9 / 2?"}]
    prompt = render_prompt(messages, ChatOptions(**DATE))
    assert "Simple arithmetic." not in prompt
    assert prompt.endswith("<|start|>user<|message|>What is 2 + 2?<|end|>"
                           "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|end|>"
                           "<|start|>user<|message|>What about 9 / 2?<|end|><|start|>assistant")


def test_reasoning_effort_is_validated():
    with pytest.raises(ValueError, match="reasoning_effort"):
        ChatOptions.from_dict({"reasoning_effort": "extreme"})


def test_hook_ids_carry_the_special_tokens_and_match_the_tokenizer_template(tokenizer):
    messages = [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Bonjour!"},
                {"role": "assistant", "content": "Salut."}, {"role": "user", "content": "Ça va?"}]
    prompt_ids = render_chat(tokenizer, messages, {"reasoning_effort": "low", **DATE, "unknown_option": 1})
    start, end = tokenizer.convert_tokens_to_ids(["<|start|>", "<|end|>"])
    assert prompt_ids.count(start) == 6 and prompt_ids.count(end) == 5     # system, developer, 3 turns, prompt
    templated = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                              reasoning_effort="low", **DATE)
    assert prompt_ids == ids(tokenizer, templated)


# ---- parsing ----------------------------------------------------------------------------------------

SPEC_OUTPUT = ("<|channel|>analysis<|message|>User asks: \"What is 2 + 2?\" Simple arithmetic. Provide answer.<|end|>"
               "<|start|>assistant<|channel|>final<|message|>2 + 2 = 4.<|return|>")


def test_splits_analysis_from_final(tokenizer):
    reasoning, content = reasoning_parser(tokenizer, ids(tokenizer, SPEC_OUTPUT))
    assert reasoning == 'User asks: "What is 2 + 2?" Simple arithmetic. Provide answer.'
    assert content == "2 + 2 = 4."


def test_final_only_output_has_no_reasoning(tokenizer):
    assert reasoning_parser(tokenizer, ids(tokenizer, "<|channel|>final<|message|>Hi.<|return|>")) == (None, "Hi.")


def test_tool_calls_are_parsed_but_kept_out_of_content_while_preambles_are_shown(tokenizer):
    output = ("<|channel|>analysis<|message|>Need weather.<|end|>"
              "<|start|>assistant<|channel|>commentary<|message|>Checking the weather.<|end|>"
              "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json<|message|>"
              '{"location":"SF"}<|call|>')
    messages = parse_completion(tokenizer, ids(tokenizer, output))
    call = messages[-1]
    assert (call.channel, call.recipient, call.content_type, call.content) == \
        ("commentary", "functions.get_weather", "json", '{"location":"SF"}')
    assert reasoning_parser(tokenizer, ids(tokenizer, output)) == ("Need weather.", "Checking the weather.")


def test_tokens_after_a_stop_token_are_ignored(tokenizer):
    output = ids(tokenizer, "<|channel|>final<|message|>Done.<|return|>") + ids(tokenizer, "garbage")
    assert reasoning_parser(tokenizer, output) == (None, "Done.")


def test_parser_is_prefix_monotonic_for_streaming(tokenizer):
    """Every prefix's (reasoning, content) is a prefix of the next one's, multi-byte characters included."""
    output = ids(tokenizer, "<|channel|>analysis<|message|>Café? 東京 😀 think.<|end|><|start|>assistant"
                            "<|channel|>final<|message|>Привет, 東京! 😀<|return|>")
    previous = ("", "")
    for n in range(len(output) + 1):
        reasoning, content = reasoning_parser(tokenizer, output[:n])
        reasoning = reasoning or ""
        assert reasoning.startswith(previous[0]) and content.startswith(previous[1]), n
        assert "\ufffd" not in reasoning + content
        previous = (reasoning, content)
    assert previous == ("Café? 東京 😀 think.", "Привет, 東京! 😀")


def test_engine_stops_on_harmony_stop_tokens_but_not_on_end(tiny_gpt_oss, tokenizer):
    engine = LLM(str(tiny_gpt_oss), device="cpu", dtype="float32", num_gpu_blocks=16).engine
    stops = set(tokenizer.convert_tokens_to_ids(["<|return|>", "<|call|>", "<|endoftext|>"]))
    assert set(engine.eos_token_ids) == stops
    assert tokenizer.convert_tokens_to_ids("<|end|>") not in engine.eos_token_ids


def test_offline_chat_renders_harmony_not_the_jinja_template(tiny_gpt_oss):
    from runtime import LLM, SamplingParams
    llm = LLM(str(tiny_gpt_oss), device="cpu", dtype="float32")
    output = llm.chat([{"role": "user", "content": "Hi"}], SamplingParams(max_tokens=1), use_tqdm=False)[0]
    prompt = llm.tokenizer.decode(output.prompt_token_ids, skip_special_tokens=False)
    assert prompt.endswith("<|start|>user<|message|>Hi<|end|><|start|>assistant")


CALL = ('<|channel|>analysis<|message|>A<|end|><|start|>assistant<|channel|>commentary to=functions.get_weather '
        '<|constrain|>json<|message|>{"location":"SF","days":[1, 2]}<|call|>')
CHARS = CharTokenizer(SPECIAL_TOKENS)


@pytest.mark.parametrize("text", [CALL, CALL.replace("<|channel|>commentary to=functions.get_weather",
                                                     " to=functions.get_weather<|channel|>commentary")])
def test_a_commentary_message_to_a_function_is_a_tool_call(text):
    message = final_message(parse_output, CHARS, CHARS.encode(text))
    assert message == {"reasoning": "A", "content": "", "finish_reason": "tool_calls",
                       "calls": [("get_weather", '{"location": "SF", "days": [1, 2]}')]}
    for step in (1, 4):
        assert streamed_message(parse_output, CHARS, CHARS.encode(text), step) == message


def test_a_preamble_before_the_call_is_content():
    text = CALL.replace("<|start|>assistant<|channel|>commentary to", "<|start|>assistant<|channel|>commentary"
                        "<|message|>Checking.<|end|><|start|>assistant<|channel|>commentary to")
    message = streamed_message(parse_output, CHARS, CHARS.encode(text))
    assert message["content"] == "Checking." and [n for n, _ in message["calls"]] == ["get_weather"]


def test_forced_tool_choice_returns_valid_calls(tiny_gpt_oss):
    check_forced_tool_calls(tiny_gpt_oss, "gpt_oss")
