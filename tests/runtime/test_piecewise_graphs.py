"""Piecewise CUDA graphs: the forward splits at every attention call (ctx.graph_break), attention then runs
on the live step's metadata between the pieces. On CPU the split itself is checked for every model package
(no graphs there: the pieces run eagerly); on the GPU, piecewise replay against eager greedy tokens."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from runtime import LLM, SamplingParams
from tools.parity import make_tiny_checkpoint, random_prompts


def mixed_step(llm):
    """The first step of three prompts and, once they decode, a step mixing decodes with a new prompt."""
    engine = llm.engine
    for i, n in enumerate((9, 30, 4)):
        engine.add_request(f"r{i}", list(range(10 + i, 10 + i + n)), SamplingParams(max_tokens=8, ignore_eos=True))
    return engine.scheduler.schedule()


@pytest.mark.parametrize("arch", ["qwen3", "gpt_oss", "gemma4"])
def test_forward_splits_at_every_attention_call(arch, tiny_checkpoint):
    path = tiny_checkpoint(arch)
    llm = LLM(str(path), device="cpu", skip_tokenizer_init=True, block_size=4, max_num_batched_tokens=64)
    runner, model = llm.engine.runner, llm.engine.model
    plan = mixed_step(llm)
    input_ids, ctx, _ = runner.prepare_inputs(plan, pad_tokens_to=64)        # a bucket: 21 pad tokens
    num_tokens = plan.num_tokens
    with torch.inference_mode():
        real = replace(ctx, positions=ctx.positions[:num_tokens],
                       slot_mappings=[slots[:num_tokens] for slots in ctx.slot_mappings])
        expected = model(input_ids[:num_tokens], real.positions, real)
        breaks = []

        def graph_break(q, attend):                 # what a replay does: attention fills the real rows only
            out = torch.full_like(q, 7.0)
            breaks.append(q.shape)
            attend(ctx, out[:num_tokens])
            return out
        ctx.graph_break = graph_break
        split = model(input_ids, ctx.positions, ctx)
    assert len(breaks) == len(runner.caches) and all(shape[0] == 64 for shape in breaks)
    torch.testing.assert_close(split[:num_tokens], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_piecewise_graphs_match_eager_greedy_tokens(tmp_path):
    """Chunked prefill next to decodes (a 48-token budget): every such step replays a bucket's pieces.
    fp32, because a bucket pads the GEMMs to other shapes than eager's, whose bf16 rounding flips a random
    model's near ties (as in test_cuda_graphs_match_eager_greedy_tokens)."""
    path = make_tiny_checkpoint("qwen3", tmp_path / "qwen3")
    prompts = random_prompts(1024, (5, 77, 200, 13, 64, 9, 150, 33), seed=4)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    results, replays = [], []
    for piecewise in (False, True):
        llm = LLM(str(path), device="cuda", dtype="float32", enforce_eager=not piecewise,
                  piecewise_cuda_graphs=piecewise, skip_tokenizer_init=True, max_num_seqs=8,
                  max_num_batched_tokens=48, block_size=16, gpu_memory_utilization=0.5)
        runner = llm.engine.runner
        assert bool(runner.piecewise) is piecewise
        replay = runner._replay_piecewise
        runner._replay_piecewise = lambda *args: replays.append(args[0]) or replay(*args)
        results.append([o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        del runner, replay, llm
        torch.cuda.empty_cache()
    assert len(replays) > 10 and len(set(replays)) >= 2           # several steps, more than one bucket
    assert results[0] == results[1]
