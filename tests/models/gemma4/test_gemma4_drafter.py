"""The assistant drafter reproduces transformers' Gemma 4 assistant drafting (SinglePositionMultiTokenCandidate-
Generator), reading the target's paged cache where transformers reads its shared_kv_states.

transformers 5.23 cannot build an assistant (spec 6.4): its config's all-shared layers make kv_sharing_modes
raise. The oracle here patches that one property to call every layer a reader, as the assistant intends."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import AutoConfig, Gemma4TextConfig

from models.gemma4.drafter import Gemma4Assistant
from runtime import LLM, SamplingParams
from runtime.forward import ForwardContext
from runtime.loader import iterate_weights
from runtime.spec_decode import DraftInputs
from tools.parity import load_transformers, random_prompts

S, F = "sliding_attention", "full_attention"
NUM_DRAFTS = 4


@pytest.fixture
def all_shared_assistants_build(monkeypatch):
    original = Gemma4TextConfig.kv_sharing_modes.fget

    def kv_sharing_modes(config):
        if config.num_kv_shared_layers == config.num_hidden_layers:
            return ["reuse"] * config.num_hidden_layers
        return original(config)
    monkeypatch.setattr(Gemma4TextConfig, "kv_sharing_modes", property(kv_sharing_modes))


@pytest.fixture
def tiny_assistant(all_shared_assistants_build, tiny_gemma4, tmp_path):
    """A 2-layer assistant for the tiny E2B-like target (same head dims and KV heads), with ordered embeddings."""
    from transformers.models.gemma4_assistant import Gemma4AssistantConfig, Gemma4AssistantForCausalLM
    target = AutoConfig.from_pretrained(tiny_gemma4).get_text_config()
    text = dict(model_type="gemma4_text", vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=1, head_dim=32, global_head_dim=64, layer_types=[S, F],
                sliding_window=target.sliding_window, hidden_size_per_layer_input=0, vocab_size_per_layer_input=0,
                max_position_embeddings=512, rope_parameters=target.rope_parameters, rms_norm_eps=1e-6)
    config = Gemma4AssistantConfig(text_config=text, backbone_hidden_size=target.hidden_size,
                                   use_ordered_embeddings=True, num_centroids=16, centroid_intermediate_top_k=4)
    torch.manual_seed(0)
    model = Gemma4AssistantForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_norm.weight",)):
                param.copy_(0.25 * (1 + 0.1 * torch.randn(param.shape, generator=generator)))
            elif name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator))
            else:
                param.copy_(0.15 * torch.randn(param.shape, generator=generator))
        for layer in model.model.layers:
            layer.layer_scalar.copy_(1 + 0.2 * torch.randn(1, generator=generator))
        model.masked_embedding.token_ordering.copy_(torch.randperm(512, generator=generator))
    model.save_pretrained(tmp_path / "assistant")
    return model, tmp_path / "assistant"


@torch.inference_mode()
def reference_drafts(target, assistant, prompt: list[int]) -> tuple[list[int], int, torch.Tensor]:
    """transformers' drafting round after the prefill: (drafts, the target's token, the first draft's state)."""
    out = target.model.language_model(torch.tensor([prompt]), return_shared_kv_states=True, use_cache=False)
    hidden = out.last_hidden_state[:, -1:]
    token = target.lm_head(hidden).argmax(-1)                         # softcap is monotonic: same argmax
    first_token = int(token)
    position = torch.tensor([[len(prompt)]])
    drafts, first_state = [], None
    for _ in range(NUM_DRAFTS):
        embedded = target.model.language_model.embed_tokens(token)
        step = assistant(inputs_embeds=torch.cat([embedded, hidden], dim=-1), position_ids=position,
                         shared_kv_states=out.shared_kv_states)
        token, hidden = step.logits.argmax(-1), step.last_hidden_state
        first_state = hidden[0, 0] if first_state is None else first_state
        drafts.append(int(token))
    return drafts, first_token, first_state


def engine_prefill(path, prompt: list[int]):
    """Our target on the prompt: (engine, the prefill step's context and hidden states, the sampled token)."""
    llm = LLM(str(path), device="cpu", dtype="float32", block_size=4)
    runner, captured = llm.engine.runner, {}
    model = runner.model

    class Capture:
        def __call__(self, input_ids, positions, ctx):
            hidden = model(input_ids, positions, ctx)
            captured.setdefault("step", (input_ids.clone(), positions.clone(), ctx, hidden))
            return hidden

        def compute_logits(self, hidden):
            return model.compute_logits(hidden)
    runner.model = Capture()
    token = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=1), use_tqdm=False)[0].token_ids[0]
    runner.model = model
    return llm.engine, captured["step"], token


def draft_inputs(engine, step, drafter: Gemma4Assistant, token: int) -> DraftInputs:
    input_ids, positions, ctx, hidden = step
    specs = drafter.cache_specs()
    caches = list(ctx.caches) + [ctx.caches[s.shared_with] for s in specs]
    layer_group = list(ctx.layer_group) + [ctx.layer_group[s.shared_with] for s in specs]

    def decode_context(last_positions: torch.Tensor) -> ForwardContext:
        seq_lens = (last_positions + 1).to(torch.int32)
        return ForwardContext(
            positions=last_positions, query_start_loc=torch.tensor([0, 1], dtype=torch.int32), seq_lens=seq_lens,
            num_computed=last_positions.to(torch.int32), logits_indices=torch.tensor([0]),
            block_tables=ctx.block_tables, slot_mappings=[torch.full((1,), -1) for _ in ctx.slot_mappings],
            caches=caches, layer_group=layer_group, block_size=ctx.block_size, max_query_len=1,
            max_seq_len=int(seq_lens.max()), query_start_loc_host=np.array([0, 1]), seq_lens_host=seq_lens.numpy())
    next_ids = torch.cat([input_ids[1:], torch.tensor([token])])
    return DraftInputs(target_hidden=hidden, next_token_ids=next_ids, positions=positions, ctx=ctx,
                       last_rows=torch.tensor([len(input_ids) - 1]), num_drafts=NUM_DRAFTS,
                       decode_context=decode_context)


@pytest.mark.parametrize("length", [5, 40])                 # within and beyond the sliding window of 8
@torch.inference_mode()
def test_drafts_match_transformers_assistant(tiny_gemma4, tiny_assistant, length):
    hf_assistant, assistant_dir = tiny_assistant
    prompt = random_prompts(512, (length,), seed=7)[0]
    expected, hf_token, hf_state = reference_drafts(load_transformers(tiny_gemma4), hf_assistant, prompt)

    engine, step, token = engine_prefill(tiny_gemma4, prompt)
    assert token == hf_token
    drafter = Gemma4Assistant(engine.model, AutoConfig.from_pretrained(assistant_dir), 512, torch.float32)
    drafter.load_weights(iterate_weights(assistant_dir))
    inputs = draft_inputs(engine, step, drafter, token)
    drafts = drafter.propose(inputs)
    rows = inputs.last_rows
    _, state = drafter.draft_one(inputs.next_token_ids[rows], inputs.target_hidden[rows], inputs.positions[rows] + 1,
                                 inputs.decode_context(inputs.positions[rows]))
    assert (state[0] - hf_state).abs().max().item() < 1e-4
    assert drafts.tolist() == [expected]
    assert len(set(expected)) > 1 or length == 5           # drafts that vary: the head is exercised


def test_drafting_through_the_engine_is_lossless(tiny_gemma4, tiny_assistant):
    """speculative_config draft_model: greedy outputs identical with and without the assistant, through small
    blocks (sliding blocks recycled), chunked prefill and several requests."""
    _, assistant_dir = tiny_assistant
    prompts = random_prompts(512, (3, 17, 40, 64), seed=8)
    params = SamplingParams(temperature=0.0, max_tokens=24)
    options = dict(device="cpu", dtype="float32", block_size=4, max_num_batched_tokens=32)
    plain = LLM(str(tiny_gemma4), **options).generate(prompts, params, use_tqdm=False)
    spec = {"method": "draft_model", "model": str(assistant_dir), "num_speculative_tokens": 3}
    llm = LLM(str(tiny_gemma4), speculative_config=spec, **options)
    drafted = llm.generate(prompts, params, use_tqdm=False)
    assert [o.token_ids for o in drafted] == [o.token_ids for o in plain]
    assert llm.engine.spec_stats.num_draft_tokens > 50
    window = {g.spec.window for g in llm.engine.kv.groups} - {None}
    assert window == {9}                        # the target's sliding groups keep the assistant's W + 1
