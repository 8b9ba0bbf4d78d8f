"""tool_choice required / a named function on a family's tiny tokenizer: whatever a model picks among the tokens
the package's tool-call grammar allows (from the first generated token: a reasoning model does not think
first), its parser reads calls whose arguments follow the schemas. Each family's tests call this with their
session checkpoint."""
from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from transformers import AutoConfig

from runtime.engine import _eos_token_ids
from runtime.registry import get_package
from runtime.structured import GrammarCache, StructuredOutputsParams
from runtime.tokenizer import Tokenizer
from tests.runtime.test_structured_outputs import validate

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "days", "unit"]}
CLOCK = {"type": "object", "properties": {"zone": {"enum": ["utc", "local"]},
                                          "at": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 0,
                                                 "maxItems": 2}},
         "required": ["zone", "at"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": CLOCK}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": CLOCK}




def check_forced_tool_calls(checkpoint, family: str, walks: int = 24) -> None:
    """Random walks through the grammar stand in for a random model (the engine path is tested on Qwen3):
    each step picks a random allowed token, a stop token with even odds once one is allowed."""
    package = get_package(family)
    tokenizer = Tokenizer(str(checkpoint))
    stops = list(_eos_token_ids(Path(checkpoint), AutoConfig.from_pretrained(checkpoint).get_text_config(),
                                tokenizer))
    grammars = GrammarCache(tokenizer.hf, len(tokenizer.hf), stops)
    rng = random.Random(0)
    for name in ("get_time", None, None):
        params = StructuredOutputsParams(grammar=package.tool_call_grammar(TOOLS, name, False))
        for _ in range(walks // 3):
            matcher, ids = grammars.matcher(params, []), []
            bitmask = torch.zeros(1, (len(tokenizer.hf) + 31) // 32, dtype=torch.int32)
            while True:
                matcher.fill(bitmask, 0)
                bits = (bitmask[0].unsqueeze(1) >> torch.arange(32)) & 1          # [words, 32]
                allowed = bits.flatten()[:len(tokenizer.hf)].nonzero().flatten().tolist()
                stop = [t for t in allowed if t in stops]
                token = rng.choice(stop) if stop and (rng.random() < 0.5 or len(stop) == len(allowed)) else \
                    rng.choice([t for t in allowed if t not in stops])
                ids.append(token)
                if token in stops:
                    break
                matcher.accept(token)
                assert len(ids) < 2000
            parsed = package.tool_parser(tokenizer, ids, True)
            text = tokenizer.decode(ids, skip_special_tokens=False)
            assert parsed.calls and not parsed.reasoning, text
            for call in parsed.calls:
                assert call.complete and (name is None or call.name == name), text
                validate(json.loads(call.arguments), SCHEMAS[call.name])
