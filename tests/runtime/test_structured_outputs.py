"""Structured outputs on the tiny Qwen3 (random weights, so only the grammar makes the text well formed):
JSON schemas, JSON objects, regexes and choices hold over seeded samples; rows without a grammar in the same
batch sample exactly as without the constrained rows; invalid constraints are refused at admission."""
from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch

from runtime import LLM, SamplingParams
from runtime.structured import StructuredOutputsParams
from runtime.tokenizer import Tokenizer
from tools.parity import random_prompts

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3},
        "pet": {"type": "object", "properties": {"kind": {"enum": ["cat", "dog"]}}, "required": ["kind"]},
    },
    "required": ["name", "age", "tags", "pet"],
}


def validate(value, schema) -> None:
    """The subset of JSON Schema that SCHEMA uses (jsonschema is not a dependency)."""
    if "enum" in schema:
        assert value in schema["enum"]
        return
    kind = schema["type"]
    if kind == "object":
        assert isinstance(value, dict)
        assert set(schema.get("required", [])) <= set(value) <= set(schema["properties"])
        for key, item in value.items():
            validate(item, schema["properties"][key])
    elif kind == "array":
        assert isinstance(value, list) and schema["minItems"] <= len(value) <= schema["maxItems"]
        for item in value:
            validate(item, schema["items"])
    elif kind == "string":
        assert isinstance(value, str) and len(value) <= schema["maxLength"]
    elif kind == "integer":
        assert isinstance(value, int) and schema["minimum"] <= value <= schema["maximum"]


@pytest.fixture(scope="module")
def llm(tiny_qwen3):
    return LLM(str(tiny_qwen3), device="cpu", dtype="float32", block_size=8, max_num_batched_tokens=64)


def constrained(so: StructuredOutputsParams, seed: int, **options) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "seed": seed, "max_tokens": 120, "structured_outputs": so, **options})


def test_json_schema_outputs_parse_and_validate(llm):
    prompts = random_prompts(1024, (5, 17, 9, 30), seed=1) * 3
    params = [constrained(StructuredOutputsParams(json=SCHEMA), seed) for seed in range(len(prompts))]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for output in outputs:
        assert output.finish_reason == "stop", output.text
        validate(json.loads(output.text), SCHEMA)
    assert len({o.text for o in outputs}) > 1                   # sampled, not one forced string


def test_json_object_regex_and_choice(llm):
    prompts = random_prompts(1024, (7, 12, 25), seed=2)
    choices = ["yes", "no", "maybe not"]
    for seed, prompt in enumerate(prompts):
        obj, regex, choice = llm.generate(
            [prompt] * 3,
            [constrained(StructuredOutputsParams(json_object=True), seed),
             constrained(StructuredOutputsParams(regex=r"[a-z]{3}-\d{2,4}"), seed),
             constrained(StructuredOutputsParams(choice=choices), seed, max_tokens=8)], use_tqdm=False)
        assert isinstance(json.loads(obj.text), dict)
        assert re.fullmatch(r"[a-z]{3}-\d{2,4}", regex.text), regex.text
        assert choice.text in choices


def test_greedy_choice_and_dict_params(llm):
    output = llm.generate([random_prompts(1024, (10,), seed=3)[0]],
                          SamplingParams(temperature=0.0, max_tokens=10,
                                         structured_outputs={"choice": ["left", "right"]}), use_tqdm=False)[0]
    assert output.text in ("left", "right")


def test_unconstrained_rows_are_unchanged(llm):
    prompts = random_prompts(1024, (6, 21, 14), seed=4)
    free = [SamplingParams(temperature=0.8, seed=11, max_tokens=24, ignore_eos=True),
            SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)]
    alone = llm.generate(prompts[:2], free, use_tqdm=False)
    mixed = llm.generate([prompts[0], prompts[2], prompts[1]],
                         [free[0], constrained(StructuredOutputsParams(json=SCHEMA), 5), free[1]], use_tqdm=False)
    assert [o.token_ids for o in alone] == [mixed[0].token_ids, mixed[2].token_ids]
    validate(json.loads(mixed[1].text), SCHEMA)


def test_grammar_requests_take_drafts_and_decode_as_without_them(tiny_qwen3):
    """Speculative decoding under a grammar: each verification row is masked as the grammar stands after the
    drafts before it and the matcher rolls back what the target rejects, so greedy outputs are those of
    plain decoding."""
    prompt = [5, 6, 7, 8] * 6
    params = [constrained(StructuredOutputsParams(regex=r"[ab]{8,40}c"), 0),
              constrained(StructuredOutputsParams(json=SCHEMA), 0),
              constrained(StructuredOutputsParams(choice=["abab", "abba", "baab"]), 0)]
    params = [replace(p, temperature=0.0, max_tokens=40) for p in params]
    plain = LLM(str(tiny_qwen3), device="cpu", dtype="float32", block_size=8)
    expected = [o.outputs[0].token_ids for o in plain.generate([prompt] * 3, params, use_tqdm=False)]
    for k in (3,):
        spec = LLM(str(tiny_qwen3), device="cpu", dtype="float32", block_size=8,
                   speculative_config={"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_min": 1})
        outputs = spec.generate([prompt] * 3, params, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outputs] == expected
        stats = spec.engine.spec_stats
        assert stats.num_drafts > 0 and stats.num_accepted_tokens > 0        # only grammar rows here
    assert re.fullmatch(r"[ab]{8,40}c", outputs[0].outputs[0].text)
    assert outputs[2].outputs[0].text in ("abab", "abba", "baab")


@pytest.mark.parametrize("so, message", [
    (dict(json={"type": "object", "properties": {"a": {"type": "nosuchtype"}}}), "invalid JSON schema"),
    (dict(json="{not json"), "invalid JSON schema"),
    (dict(regex="(unclosed"), "invalid regex"),
])
def test_invalid_constraints_are_refused(llm, so, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([[5, 6, 7]], SamplingParams(structured_outputs=StructuredOutputsParams(**so)), use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()


def test_on_a_reasoning_model_the_grammar_starts_after_the_reasoning(tiny_qwen3):
    """Qwen3's gate: the first token may open a think block (besides what the grammar allows); inside it rows
    are free; after `</think>` the grammar applies from its start. Drafts roll back across the boundary.
    A forced constraint (in_reasoning) applies from the first token."""
    from models.qwen3.chat import reasoning_gate
    from runtime.structured import GrammarCache
    tokenizer = Tokenizer(str(tiny_qwen3))
    hf = tokenizer.hf
    think, end = hf.convert_tokens_to_ids("<think>"), hf.convert_tokens_to_ids("</think>")
    cache = GrammarCache(hf, len(hf), [hf.convert_tokens_to_ids("<|im_end|>")],
                         lambda prompt: reasoning_gate(tokenizer, prompt))
    so = StructuredOutputsParams(regex=r"[ab]{2}c")
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}])
    masks = torch.zeros(4, (len(hf) + 31) // 32, dtype=torch.int32)

    def allowed(row: int) -> set[int]:
        bits = (masks[row].unsqueeze(1) >> torch.arange(32)) & 1
        return set(bits.flatten()[:len(hf)].nonzero().flatten().tolist())
    plain = cache.matcher(replace(so, in_reasoning=True), [], prompt)
    plain.fill(masks, 0)
    grammar_start = allowed(0)
    assert think not in grammar_start and len(grammar_start) < 20
    gated = cache.matcher(so, [], prompt)
    gated.fill(masks, 1)
    assert allowed(1) == grammar_start | {think}
    thought = [think] + hf.encode("hmm", add_special_tokens=False) + [end]
    assert gated.fill_along(masks, 0, thought[:3]) == 3
    assert allowed(1) == set(range(len(hf)))              # inside the thought: free
    gated.rollback(3)
    for token in thought:
        gated.accept(token)
    gated.fill(masks, 3)
    assert allowed(3) == grammar_start
    closed = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], enable_thinking=False)
    answer = cache.matcher(so, [], closed)
    answer.fill(masks, 2)
    assert allowed(2) == grammar_start                    # enable_thinking=False: the answer comes at once


def test_an_end_marker_of_several_tokens_ends_the_reasoning_across_fills_and_rollbacks(tiny_qwen3):
    """The engine fills every step's mask (and rolls back the drafts it walked, none without drafts) between
    the tokens it accepts: a marker of several tokens (gpt-oss' `<|channel|>final<|message|>`) must still be
    seen, also when drafts cross it and are rolled back."""
    from runtime.structured import GrammarCache, ReasoningGate
    hf = Tokenizer(str(tiny_qwen3)).hf
    end = tuple(hf.encode("final answer:", add_special_tokens=False))
    assert len(end) >= 3
    cache = GrammarCache(hf, len(hf), [hf.convert_tokens_to_ids("<|im_end|>")],
                         lambda prompt: ReasoningGate("reasoning", end))
    so = StructuredOutputsParams(regex=r"[ab]{2}c")
    masks = torch.zeros(len(end) + 2, (len(hf) + 31) // 32, dtype=torch.int32)

    def allowed(row: int) -> set[int]:
        bits = (masks[row].unsqueeze(1) >> torch.arange(32)) & 1
        return set(bits.flatten()[:len(hf)].nonzero().flatten().tolist())
    cache.matcher(replace(so, in_reasoning=True), []).fill(masks, 0)
    grammar_start = allowed(0)
    gated = cache.matcher(so, [])
    for token in hf.encode("so", add_special_tokens=False) + list(end):
        gated.fill(masks, 1)
        assert allowed(1) == set(range(len(hf)))           # free until the whole marker is in
        gated.rollback(0)
        gated.accept(token)
    gated.fill(masks, 1)
    assert allowed(1) == grammar_start
    crossing = cache.matcher(so, [])
    assert crossing.fill_along(masks, 0, [*end, min(grammar_start)]) == len(end) + 1
    assert allowed(len(end) - 1) == set(range(len(hf)))     # the marker's last token is still reasoning
    assert allowed(len(end)) == grammar_start               # the row after the marker: the grammar's start
    crossing.rollback(len(end) + 1)
    for token in end:
        crossing.accept(token)
    crossing.fill(masks, 2)
    assert allowed(2) == grammar_start
