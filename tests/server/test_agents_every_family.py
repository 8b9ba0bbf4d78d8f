"""Structured outputs and tool calling end to end on the tiny random model of every family, through a real
server and the official openai client (one server per family): json_schema answers parse and validate over
dozens of seeded samples, streamed and not; tool_choice required / named return valid calls whose streamed
arguments are the whole reply's; `none` returns none; a conversation carrying a tool result is accepted; bad
constraints get a 400.

Where each family's answer starts: Qwen3 and DeepSeek V4 are asked with thinking off (the grammar holds from
the first token). Gemma 4 may open a thought with its first token, and a random model that does never closes
it: such samples carry reasoning and no content. gpt-oss answers in the final channel, which a random model
never reaches: its checkpoint is turned into one whose first tokens are `<|channel|>final<|message|>` (a
bigram lm_head for those tokens, near-zero logits after them), so the grammar takes over after the
reasoning gate as it would on a real model."""
from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.gpt_oss.harmony import render_chat
from runtime.registry import get_package
from runtime.tokenizer import Tokenizer
from tests.server.server_process import MODEL, error_of, start_server
from tools.parity import make_tiny_checkpoint

FAMILIES = ["qwen3", "gpt_oss", "deepseek_v4", "gemma4"]
ANSWER_AT_ONCE = {"qwen3": {"chat_template_kwargs": {"enable_thinking": False}},
                  "deepseek_v4": {"chat_template_kwargs": {"thinking": False}}}
SAMPLES = 8                          # per request (n), seeded: seed + i for sample i
# the tiny tokenizers spell tool definitions (and DeepSeek V4's tool instructions) in many tokens
MAX_MODEL_LEN = 2048

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "nick": {"type": "string", "maxLength": 4},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3},
        "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]},
                                                 "legs": {"type": "integer", "minimum": 0, "maximum": 4}},
                "required": ["kind"]},
        "scores": {"type": "array", "minItems": 1, "maxItems": 2,
                   "items": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 1, "maximum": 9},
                                                              "ok": {"type": "boolean"}},
                             "required": ["id", "ok"]}},
    },
    "required": ["name", "age", "role", "tags", "pet", "scores"],
}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "days", "unit"]}
CLOCK = {"type": "object", "properties": {"zone": {"enum": ["utc", "local"]},
                                          "at": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                            "maximum": 9},
                                                 "minItems": 0, "maxItems": 2}},
         "required": ["zone", "at"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]


def check(value, schema: dict, at: str = "$") -> None:
    """The JSON Schema keywords the schemas above use (jsonschema is not a dependency)."""
    if "enum" in schema:
        assert value in schema["enum"], f"{at}: {value!r} not in {schema['enum']}"
        return
    kind = schema["type"]
    if kind == "object":
        assert isinstance(value, dict), f"{at}: {value!r} is no object"
        properties = schema.get("properties", {})
        assert set(schema.get("required", [])) <= set(value) <= set(properties), f"{at}: keys {sorted(value)}"
        for key, item in value.items():
            check(item, properties[key], f"{at}.{key}")
    elif kind == "array":
        assert isinstance(value, list), f"{at}: {value!r} is no array"
        assert schema.get("minItems", 0) <= len(value) <= schema.get("maxItems", len(value)), f"{at}: {len(value)} items"
        for i, item in enumerate(value):
            check(item, schema["items"], f"{at}[{i}]")
    elif kind == "string":
        assert isinstance(value, str) and len(value) <= schema.get("maxLength", len(value)), f"{at}: {value!r}"
    elif kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{at}: {value!r} is no integer"
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value), f"{at}: {value} out of bounds"
    elif kind == "boolean":
        assert isinstance(value, bool), f"{at}: {value!r} is no boolean"
    else:
        raise AssertionError(f"{at}: the checker does not know type {kind!r}")


def final_channel_first(checkpoint, out_dir):
    """The tiny gpt-oss with attention and experts writing nothing and an lm_head that maps the prompt's last
    token to `<|channel|>final<|message|>`, one token after another; every other logit is near zero."""
    tokenizer = Tokenizer(str(checkpoint))
    last = render_chat(tokenizer, MESSAGES, {})[-1]              # every prompt ends `<|start|>assistant`
    script = [last, *tokenizer.hf.encode("<|channel|>final<|message|>", add_special_tokens=False)]
    assert len(set(script)) == len(script)
    shutil.copytree(checkpoint, out_dir)
    weights = load_file(out_dir / "model.safetensors")
    for name in weights:
        if name.endswith(("o_proj.weight", "o_proj.bias", "down_proj_blocks", "down_proj_bias")):
            weights[name] = torch.zeros_like(weights[name])       # MXFP4 code 0 is 0.0
    embeddings = weights["model.embed_tokens.weight"].float()
    lm_head = torch.zeros_like(weights["lm_head.weight"], dtype=torch.float32)
    for current, following in zip(script[:-1], script[1:]):
        lm_head[following] += 12.0 * embeddings[current] / embeddings[current].norm()
    weights["lm_head.weight"] = lm_head.to(weights["lm_head.weight"].dtype)
    save_file(weights, out_dir / "model.safetensors", metadata={"format": "pt"})
    return out_dir


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    """(family, its server): the session's tools server for Qwen3, a fresh one for the others."""
    name = request.param
    if name == "qwen3":
        yield name, request.getfixturevalue("tools_server")
        return
    root = tmp_path_factory.mktemp(f"agents-{name}")
    longer = {"max_position_embeddings": MAX_MODEL_LEN}
    tiny_config = get_package(name).tiny_config
    if "text_config" in tiny_config:                      # a multimodal layout nests the decoder's config
        longer = {"text_config": {**tiny_config["text_config"], **longer}}
    checkpoint = make_tiny_checkpoint(name, root / "tiny", overrides=longer)
    if name == "gpt_oss":
        checkpoint = final_channel_first(checkpoint, root / "final-first")
    handle = start_server(checkpoint, root / "server.log", "--max-model-len", str(MAX_MODEL_LEN), arch=None)
    yield name, handle
    handle.stop()


def at_once(*calls):
    """Run the calls concurrently (the server batches them) and return their results in order."""
    with ThreadPoolExecutor(len(calls)) as pool:
        return [future.result() for future in [pool.submit(call) for call in calls]]


def chat(handle, name: str, **request):
    extra = {**ANSWER_AT_ONCE.get(name, {}), **request.pop("extra_body", {})}
    return handle.client().chat.completions.create(model=MODEL, **{"messages": MESSAGES, "temperature": 1.0,
                                                                   "extra_body": extra, **request})


def gathered(stream) -> dict[int, dict]:
    """Per choice index: reasoning, content, finish reason and tool calls [(id, name, arguments)], from
    stream chunks; a call's first piece must carry its id, type and name."""
    choices: dict[int, dict] = {}
    for chunk in stream:
        for choice in chunk.choices:
            got = choices.setdefault(choice.index, {"reasoning": "", "content": "", "finish": None, "calls": {}})
            got["reasoning"] += getattr(choice.delta, "reasoning_content", None) or ""
            got["content"] += choice.delta.content or ""
            got["finish"] = choice.finish_reason or got["finish"]
            for piece in choice.delta.tool_calls or []:
                if piece.index not in got["calls"]:
                    assert piece.id and piece.type == "function" and piece.function.name
                    got["calls"][piece.index] = [piece.id, piece.function.name, ""]
                got["calls"][piece.index][2] += piece.function.arguments or ""
    return choices


def test_json_schema_answers_validate(family):
    """SAMPLES answers whole and SAMPLES streamed, seeded, in one batch."""
    name, handle = family
    response_format = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    request = dict(n=SAMPLES, max_tokens=200, response_format=response_format)
    whole, stream = at_once(lambda: chat(handle, name, seed=0, **request),
                            lambda: gathered(chat(handle, name, seed=100, stream=True, **request)))
    answers = [(getattr(c.message, "reasoning_content", None), c.message.content, c.finish_reason)
               for c in sorted(whole.choices, key=lambda c: c.index)]
    answers += [(c["reasoning"], c["content"], c["finish"]) for _, c in sorted(stream.items())]
    assert len(answers) == 2 * SAMPLES
    valid = 0
    for reasoning, content, finish in answers:
        if name == "gemma4" and reasoning:            # it opened a thought, which a random model never closes
            assert not content and finish == "length"
            continue
        assert not reasoning and finish == "stop", (reasoning, content, finish)
        check(json.loads(content), SCHEMA)
        valid += 1
    assert valid >= (SAMPLES if name == "gemma4" else 2 * SAMPLES), answers
    assert len({content for _, content, _ in answers}) > SAMPLES      # sampled, not one forced string


FORCED = {"required": "required", "named": {"type": "function", "function": {"name": "get_time"}}}


def test_forced_tool_calls_are_valid_and_stream_identically(family):
    """required and named, whole and streamed, in one batch: the same seeds give the same calls."""
    name, handle = family
    # one call per answer: with parallel calls a random model may keep adding calls until max_tokens (DeepSeek
    # V4's tiny tokenizer spells one DSML call in about 170 tokens)
    requests = [dict(tools=TOOLS, tool_choice=choice, n=3, seed=7, max_tokens=320, parallel_tool_calls=False)
                for choice in FORCED.values()]
    replies = at_once(*[lambda r=r: chat(handle, name, **r) for r in requests],
                      *[lambda r=r: gathered(chat(handle, name, stream=True, **r)) for r in requests])
    ids = []
    for choice, whole, streamed in zip(FORCED, replies[:2], replies[2:]):
        for c in sorted(whole.choices, key=lambda c: c.index):
            assert c.finish_reason == "tool_calls" and c.message.tool_calls, c
            calls = [(call.function.name, call.function.arguments) for call in c.message.tool_calls]
            for function, arguments in calls:
                assert function == "get_time" or choice == "required"
                check(json.loads(arguments), SCHEMAS[function])
            got = streamed[c.index]
            assert got["finish"] == "tool_calls" and got["content"] == ""
            assert [(function, arguments) for _, function, arguments in
                    (got["calls"][i] for i in sorted(got["calls"]))] == calls
            ids += [call.id for call in c.message.tool_calls] + [call_id for call_id, _, _ in got["calls"].values()]
    assert len(set(ids)) == len(ids)


def test_none_returns_no_calls_and_a_tool_result_is_accepted(family):
    name, handle = family
    reply = chat(handle, name, tools=TOOLS, tool_choice="none", seed=1, max_tokens=12)
    assert not reply.choices[0].message.tool_calls and reply.choices[0].finish_reason in ("stop", "length")
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris", "days": 2, "unit": "c"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"}]
    reply = chat(handle, name, messages=history, tools=TOOLS, seed=2, max_tokens=12)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert reply.usage.prompt_tokens > 0


BAD = [
    ("invalid schema", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nosuchtype"}}}}}}, "invalid JSON schema"),
    ("json_schema without a schema", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "json_schema.schema"),
    ("unknown named function", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "not among the tools"),
]


def test_bad_constraints_get_a_400(family):
    _, handle = family
    for case, fields, message in BAD:
        reply = handle.request("POST", "/v1/chat/completions",
                               json.dumps({"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **fields}))
        assert reply.status == 400, (case, reply.body)
        assert message in error_of(reply)["message"], case
