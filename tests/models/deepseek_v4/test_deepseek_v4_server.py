"""`run-model` serves the tiny DeepSeek V4 over the OpenAI API: a chat request renders through the package's
format and the answer is the offline engine's, split by the reasoning parser."""
from __future__ import annotations

from runtime import LLM, SamplingParams
from tests.server.server_process import MAX_MODEL_LEN, MODEL, start_server

MESSAGES = [{"role": "user", "content": "Name a colour."}]


def test_chat_completion_is_the_offline_answer(tiny_deepseek_v4, tmp_path):
    server = start_server(tiny_deepseek_v4, tmp_path / "server.log", arch="deepseek-v4")
    try:
        reply = server.client().chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6,
                                                        temperature=0.0)
    finally:
        server.stop()
    llm = LLM(str(tiny_deepseek_v4), device="cpu", dtype="float32", max_model_len=MAX_MODEL_LEN)
    offline = llm.chat([MESSAGES], SamplingParams(temperature=0.0, max_tokens=6), use_tqdm=False)[0].outputs[0]
    message = reply.choices[0].message
    expected_reasoning, expected_content = llm.engine.package.reasoning_parser(llm.tokenizer, offline.token_ids)
    assert reply.usage.completion_tokens == len(offline.token_ids)
    assert (getattr(message, "reasoning_content", None) or "") == (expected_reasoning or "")
    assert (message.content or "") == expected_content
