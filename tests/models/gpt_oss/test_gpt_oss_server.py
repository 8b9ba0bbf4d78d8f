"""The OpenAI server on gpt-oss: harmony renders the prompt, and reasoning_content / content come from the
harmony parser, whole and streamed."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from models.gpt_oss.harmony import reasoning_parser, render_chat
from runtime import LLM, SamplingParams
from runtime.request import CompletionOutput
from runtime.serve.render import ChoiceRenderer, StreamProgress
from runtime.tokenizer import Tokenizer
from tests.server.server_process import ServerProcess, free_port

MODEL = "tiny-gpt-oss"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]
OPTIONS = {"current_date": "2025-06-28", "reasoning_effort": "low"}
HARMONY_ANSWER = ("<|channel|>analysis<|message|>The user wants a colour. Café au lait?<|end|>"
                  "<|start|>assistant<|channel|>final<|message|>Blue — 青.<|return|>")
SCRIPTED_TEXT = "Red."                           # its tokens share none with "analysis" or "me"


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt_oss):
    return Tokenizer(str(tiny_gpt_oss))


def test_streamed_deltas_split_a_harmony_answer_into_reasoning_and_content(tokenizer):
    """The server's own delta logic over the gpt-oss parser, one token at a time."""
    token_ids = tokenizer.hf.encode(HARMONY_ANSWER, add_special_tokens=False)
    renderer = ChoiceRenderer(tokenizer, reasoning_parser, SamplingParams())
    sent, reasoning, content = StreamProgress(), "", ""
    for n in range(1, len(token_ids) + 1):
        delta = renderer.delta(CompletionOutput(0, "", token_ids[:n], "stop" if n == len(token_ids) else None), sent)
        if delta is not None:
            reasoning, content = reasoning + delta.reasoning, content + delta.content
    assert (reasoning, content) == ("The user wants a colour. Café au lait?", "Blue — 青.")


@pytest.fixture(scope="module")
def scripted(tiny_gpt_oss, tokenizer, tmp_path_factory) -> Path:
    """The tiny checkpoint turned into a bigram model that answers in harmony: attention and experts write
    nothing, so the logits depend on the current token alone, and lm_head maps each token of the script to
    the next. Greedy output: an analysis message, then (header without a channel, i.e. content) messages
    repeating the same text until max_tokens."""
    prompt = render_chat(tokenizer, MESSAGES, OPTIONS)
    encode = lambda text: tokenizer.hf.encode(text, add_special_tokens=False)  # noqa: E731
    # the second message's text closes the loop: from its first token on, the path is the first one's
    script = [prompt[-1]] + encode(f"<|channel|>analysis<|message|>{SCRIPTED_TEXT}<|end|><|start|>me<|message|>"
                                   f"{SCRIPTED_TEXT}")
    successors: dict[int, int] = {}
    for current, following in zip(script[:-1], script[1:]):
        assert successors.setdefault(current, following) == following, \
            f"token {current} would need two successors; change SCRIPTED_TEXT"
    path = tmp_path_factory.mktemp("scripted") / "gpt-oss"
    shutil.copytree(tiny_gpt_oss, path)
    weights = load_file(path / "model.safetensors")
    for name in weights:
        if name.endswith(("o_proj.weight", "o_proj.bias", "down_proj_blocks", "down_proj_bias")):
            weights[name] = torch.zeros_like(weights[name])       # MXFP4 code 0 is 0.0
    embeddings = weights["model.embed_tokens.weight"]
    lm_head = torch.zeros_like(weights["lm_head.weight"])
    for current, following in successors.items():
        lm_head[following] += 10.0 * embeddings[current] / embeddings[current].norm()
    weights["lm_head.weight"] = lm_head
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return path



@pytest.fixture(scope="module")
def server(scripted, tmp_path_factory):
    port = free_port()
    log_path = tmp_path_factory.mktemp("gpt-oss-server") / "server.log"
    command = [sys.executable, "-m", "runtime.cli", "gpt_oss", "--model", str(scripted), "--serve",
               "--port", str(port), "--served-model-name", MODEL, "--max-model-len", "512"]
    with open(log_path, "wb") as log:     # one intra-op thread, as tests/server does, for a busy 2-core box
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"}, cwd=Path(__file__).resolve().parents[3])
    handle = ServerProcess(process, port, log_path)
    handle.wait_healthy()
    yield handle
    handle.stop()


@pytest.fixture(scope="module")
def expected(scripted, tokenizer):
    """The offline engine's greedy completion of the harmony prompt, parsed: the scripted answer."""
    prompt = render_chat(tokenizer, MESSAGES, OPTIONS)
    llm = LLM(str(scripted), device="cpu", dtype="float32", max_model_len=512)
    output = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0]
    reasoning, content = reasoning_parser(tokenizer, output.token_ids)
    assert reasoning == SCRIPTED_TEXT and content.startswith(SCRIPTED_TEXT), (reasoning, content)
    return prompt, (reasoning, content)


def test_chat_renders_harmony_and_returns_the_parsed_parts(server, expected):
    prompt, (reasoning, content) = expected
    reply = server.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0, reasoning_effort="low",
        extra_body={"ignore_eos": True, "chat_template_kwargs": {"current_date": "2025-06-28"}})
    message = reply.choices[0].message
    assert reply.usage.prompt_tokens == len(prompt)
    assert (message.reasoning_content, message.content or "") == (reasoning, content)


def test_streamed_chat_adds_up_to_the_same_parts(server, expected):
    _, (reasoning, content) = expected
    chunks = list(server.client().chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=24, temperature=0, reasoning_effort="low", stream=True,
        extra_body={"ignore_eos": True, "chat_template_kwargs": {"current_date": "2025-06-28"}}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    streamed_reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert (streamed_reasoning, "".join(d.content or "" for d in deltas)) == (reasoning or "", content)
