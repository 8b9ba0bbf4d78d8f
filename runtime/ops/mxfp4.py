"""MXFP4 (OCP Microscaling FP4) weights and the mixture-of-experts computation that reads them.

Format (OCP MX v1.0, as checkpoints ship it): a weight [rows, K] in nn.Linear orientation is stored as
`blocks` uint8 [rows, K / 32, 16] and `scales` uint8 [rows, K / 32]. Each block of 32 consecutive input
elements shares one E8M0 scale 2^(scale - 127); each element is an E2M1 code, two per byte, the even element
in the low nibble. Leading dimensions (e.g. experts) pass through.

Three layers, each the oracle of the next: `mxfp4_dequantize` (torch, bit-exact with transformers),
`mxfp4_moe_reference` (dequantize the experts a batch touches, fp32 math; the CPU path), and two kernels
that read the packed bytes and upcast them in registers: `mxfp4_moe_triton` (W4A16 grouped GEMM, prefill)
and `mxfp4_moe_gemv` (decode: a few tokens, each token-expert pair a GEMV; for bf16 activations the
K-reduction runs on the tensor cores, mma.sync, one pair at a time)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from runtime.ops.moe import align_by_expert_ref, align_by_expert_triton

MX_BLOCK = 32                       # elements sharing one scale
# E2M1 code -> value: sign bit, 2 exponent bits (bias 1), 1 mantissa bit; code 1 is the subnormal 0.5
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


@dataclass(frozen=True, slots=True)
class GatedActivation:
    """`gate * sigmoid(alpha * gate) * (up + up_offset)`, with gate clamped above and up clamped both ways
    at `limit` when it is set. Plain SwiGLU is the default; a clamped variant uses e.g. alpha 1.702, limit 7, up_offset 1.
    `interleaved`: gate and up alternate along the output rows (gate = 2i, up = 2i + 1) instead of forming
    two halves."""
    alpha: float = 1.0
    limit: float | None = None
    up_offset: float = 0.0
    interleaved: bool = False

    def split(self, gate_up: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.interleaved:
            return gate_up[..., 0::2], gate_up[..., 1::2]
        return gate_up.chunk(2, dim=-1)

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = self.split(gate_up)
        if self.limit is not None:
            gate = gate.clamp(max=self.limit)          # one-sided: a very negative gate stays negative
            up = up.clamp(-self.limit, self.limit)
        return gate * torch.sigmoid(self.alpha * gate) * (up + self.up_offset)


@dataclass(slots=True)
class Mxfp4Linear:
    """The packed weights of one projection of every expert: y = x @ W[e].T + bias[e]."""
    blocks: torch.Tensor                # uint8 [experts, out, in / 32, 16]
    scales: torch.Tensor                # uint8 [experts, out, in / 32]
    bias: torch.Tensor | None = None    # [experts, out]

    @property
    def out_features(self) -> int:
        return self.blocks.shape[1]

    @property
    def in_features(self) -> int:
        return self.blocks.shape[2] * MX_BLOCK


# ---- format -----------------------------------------------------------------------------------------


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """blocks uint8 [..., rows, K / 32, 16], scales uint8 [..., rows, K / 32] -> [..., rows, K] in `dtype`.
    Values are FP4[code] * 2^(scale - 127), computed like transformers (ldexp) so both agree bit for bit,
    including scale 255 (inf) and tiny scales."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != MX_BLOCK // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match: "
                         f"expected blocks [..., rows, K/32, 16] and scales [..., rows, K/32]")
    lut = torch.tensor(FP4_VALUES, dtype=dtype, device=blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).flatten(-2).long()   # [..., rows, K/32, 32]
    values = torch.ldexp(lut[codes], scales.to(torch.int32)[..., None] - 127)
    return values.to(dtype).flatten(-2)


def _round_to_e2m1(magnitude: torch.Tensor) -> torch.Tensor:
    """|x| already divided by its block scale -> E2M1 magnitude code 0..7, nearest value, ties to the even
    code (whose mantissa bit is 0), saturating at 6."""
    # midpoints between consecutive values, and whether a tie rounds up (to an even code)
    midpoints = ((0.25, False), (0.75, True), (1.25, False), (1.75, True), (2.5, False), (3.5, True), (5.0, False))
    code = torch.zeros_like(magnitude, dtype=torch.uint8)
    for midpoint, tie_rounds_up in midpoints:
        code += (magnitude >= midpoint if tie_rounds_up else magnitude > midpoint).to(torch.uint8)
    return code


def mxfp4_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., rows, K] float -> (blocks, scales) in the on-disk layout. The scale of a block is amax / 6 rounded
    up to a power of two (triton_kernels' ROUND_UP rule), so the block maximum never clips. For writing test
    checkpoints: a reader needs only `mxfp4_dequantize`."""
    if weight.shape[-1] % MX_BLOCK:
        raise ValueError(f"MXFP4 needs the input dimension to be a multiple of {MX_BLOCK}, got {weight.shape[-1]}")
    grouped = weight.float().unflatten(-1, (-1, MX_BLOCK))                       # [..., rows, K/32, 32]
    amax = grouped.abs().amax(dim=-1)
    bits = (amax / 6.0).view(torch.int32)
    scale_bits = (bits + 0x7FFFFF) & 0x7F800000                                  # round up to a power of two
    scales = (scale_bits >> 23).to(torch.uint8)
    block_scale = scale_bits.view(torch.float32)
    normalized = grouped / torch.where(block_scale > 0, block_scale, 1.0)[..., None]
    codes = _round_to_e2m1(normalized.abs()) | (normalized < 0).to(torch.uint8) << 3
    blocks = codes[..., 0::2] | codes[..., 1::2] << 4                            # even element: low nibble
    return blocks.contiguous(), scales


# ---- mixture of experts -----------------------------------------------------------------------------


GEMV_MAX_PAIRS = 32         # token-expert pairs up to which the decode GEMV beats the grouped GEMM (H200)


def mxfp4_moe(x: torch.Tensor, w13: Mxfp4Linear, w2: Mxfp4Linear, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, activation: GatedActivation, skip_negative_ids: bool = False) -> torch.Tensor:
    """Routed experts on MXFP4 weights: on a GPU (unless RUN_MODEL_TORCH_OPS=1) the decode GEMV for a few
    token-expert pairs, else the grouped GEMM; the torch reference elsewhere. With `skip_negative_ids`,
    pairs whose id is negative (an expert another rank holds, under expert parallelism) contribute nothing."""
    if x.is_cuda and os.environ.get("RUN_MODEL_TORCH_OPS") != "1":
        if topk_ids.numel() <= GEMV_MAX_PAIRS:
            return mxfp4_moe_gemv(x, w13, w2, topk_weights, topk_ids, activation)
        return mxfp4_moe_triton(x, w13, w2, topk_weights, topk_ids, activation, skip_negative_ids=skip_negative_ids)
    return mxfp4_moe_reference(x, w13, w2, topk_weights, topk_ids, activation)


def mxfp4_moe_reference(x: torch.Tensor, w13: Mxfp4Linear, w2: Mxfp4Linear, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, activation: GatedActivation) -> torch.Tensor:
    """x [num_tokens, hidden]; topk_weights / topk_ids [num_tokens, k]. Returns, in x's dtype,
    sum_k weight_k * (act(x @ W13[e].T + b13[e]) @ W2[e].T + b2[e]) with e = topk_ids[:, k].

    Matmuls and the activation run in fp32 on exactly dequantized weights; the intermediate is rounded to x's
    dtype, as the kernel stores it. Only the experts the batch routes to are dequantized."""
    num_tokens, top_k = topk_ids.shape
    num_experts = w13.blocks.shape[0]
    pair_out = torch.zeros(num_tokens * top_k, w2.out_features, dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.flatten()
    flat_ids = torch.where(flat_ids < 0, num_experts, flat_ids)      # negative ids sort last, never computed
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=num_experts + 1)[:num_experts].tolist()
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        pairs = order[start:start + count]
        start += count
        h = x[pairs // top_k].float() @ mxfp4_dequantize(w13.blocks[expert], w13.scales[expert]).t()
        if w13.bias is not None:
            h = h + w13.bias[expert].float()
        h = activation(h).to(x.dtype).float()                                    # [count, inter]
        y = h @ mxfp4_dequantize(w2.blocks[expert], w2.scales[expert]).t()
        if w2.bias is not None:
            y = y + w2.bias[expert].float()
        pair_out[pairs] = y * topk_weights.flatten()[pairs, None].float()
    # each pair owns a row (no index_add_, which is slow on CPU threads); a token's k rows are summed here
    return pair_out.view(num_tokens, top_k, -1).sum(dim=1).to(x.dtype)


# ---- Triton kernel ----------------------------------------------------------------------------------
# Token-expert pairs are sorted by expert and each expert's run is padded to BLOCK_M rows, so every row block
# of the two grouped GEMMs belongs to one expert. GEMM 1 gathers token rows, applies the gated activation in
# its epilogue and writes the intermediate in sorted order; GEMM 2 reads it, adds the bias, multiplies by
# the routing weight and scatters each pair's row back; the k rows of a token are summed right after.

try:
    import triton
    import triton.language as tl
    try:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    except ImportError:                              # a Triton without programmatic dependent launch
        gdc_launch_dependents = gdc_wait = None
except ImportError:                                  # the torch reference still works without Triton
    triton = None


if triton is not None:
    @triton.jit
    def _load_mxfp4_tile(blocks_ptr, scales_ptr, expert, rows, row_mask, k_start, K,
                         stride_be, stride_br, stride_se, stride_sr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """Rows `rows` [BLOCK_N] x inputs [k_start, k_start + BLOCK_K) of one expert's weight, as fp32."""
        byte_offsets = k_start // 2 + tl.arange(0, BLOCK_K // 2)
        mask = row_mask[:, None] & (byte_offsets[None, :] < K // 2)
        packed = tl.load(blocks_ptr + expert * stride_be + rows[:, None] * stride_br + byte_offsets[None, :],
                         mask=mask, other=0).to(tl.int32)
        codes = tl.reshape(tl.join(packed & 0xF, packed >> 4), [BLOCK_N, BLOCK_K])   # low nibble = even element
        magnitude = codes & 7
        exponent = magnitude >> 1
        mantissa = (magnitude & 1).to(tl.float32)
        # E2M1: exponent 0 is the subnormal m * 0.5, else (2 + m) * 2^exponent / 4
        value = tl.where(exponent == 0, mantissa * 0.5, (2.0 + mantissa) * (1 << exponent).to(tl.float32) * 0.25)
        value = tl.where((codes & 8) != 0, -value, value)
        group_offsets = k_start // 32 + tl.arange(0, BLOCK_K // 32)
        scale_mask = row_mask[:, None] & (group_offsets[None, :] < K // 32)
        scale_bits = tl.load(scales_ptr + expert * stride_se + rows[:, None] * stride_sr + group_offsets[None, :],
                             mask=scale_mask, other=0).to(tl.int32)
        # E8M0 -> 2^(s - 127) by placing s in the fp32 exponent field (s = 0 gives 0 instead of 2^-127)
        scale = (scale_bits << 23).to(tl.float32, bitcast=True)
        scaled = tl.reshape(value, [BLOCK_N, BLOCK_K // 32, 32]) * scale[:, :, None]
        return tl.reshape(scaled, [BLOCK_N, BLOCK_K])

    @triton.jit
    def _dot(a, w, FP32: tl.constexpr):
        """a [M, K] x w [N, K] -> [M, N] fp32; w is cast to a's dtype first (that is the "A16" of W4A16)."""
        if FP32:
            return tl.dot(a, tl.trans(w.to(a.dtype)), input_precision="ieee")
        return tl.dot(a, tl.trans(w.to(a.dtype)))

    @triton.jit
    def _moe_gate_up_kernel(x_ptr, blocks_ptr, scales_ptr, bias_ptr, h_ptr, sorted_pair_ids_ptr, block_expert_ptr,
                            num_pairs, top_k, K, N,
                            stride_xm, stride_be, stride_br, stride_se, stride_sr, stride_bias, stride_hm,
                            alpha, limit, up_offset,
                            HAS_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr, INTERLEAVED: tl.constexpr,
                            FP32: tl.constexpr,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """h[sorted row, n] = act(x[token] @ W13[e].T + b13[e]) for n in this program's BLOCK_N columns."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:
            return
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_pair_ids_ptr + rows)
        row_mask = pair < num_pairs
        token = pair // top_k
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < N
        if INTERLEAVED:
            gate_rows, up_rows = 2 * n, 2 * n + 1
        else:
            gate_rows, up_rows = n, n + N
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k_start in range(0, K, BLOCK_K):
            k = k_start + tl.arange(0, BLOCK_K)
            a = tl.load(x_ptr + token[:, None] * stride_xm + k[None, :],
                        mask=row_mask[:, None] & (k[None, :] < K), other=0.0)
            w_gate = _load_mxfp4_tile(blocks_ptr, scales_ptr, expert, gate_rows, n_mask, k_start, K,
                                      stride_be, stride_br, stride_se, stride_sr, BLOCK_N, BLOCK_K)
            acc_gate += _dot(a, w_gate, FP32)
            w_up = _load_mxfp4_tile(blocks_ptr, scales_ptr, expert, up_rows, n_mask, k_start, K,
                                    stride_be, stride_br, stride_se, stride_sr, BLOCK_N, BLOCK_K)
            acc_up += _dot(a, w_up, FP32)
        if HAS_BIAS:
            acc_gate += tl.load(bias_ptr + expert * stride_bias + gate_rows, mask=n_mask, other=0.0)[None, :]
            acc_up += tl.load(bias_ptr + expert * stride_bias + up_rows, mask=n_mask, other=0.0)[None, :]
        if HAS_LIMIT:
            acc_gate = tl.minimum(acc_gate, limit)
            acc_up = tl.minimum(tl.maximum(acc_up, -limit), limit)
        h = acc_gate * tl.sigmoid(alpha * acc_gate) * (acc_up + up_offset)
        tl.store(h_ptr + rows[:, None] * stride_hm + n[None, :], h.to(h_ptr.dtype.element_ty),
                 mask=row_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _moe_down_kernel(h_ptr, blocks_ptr, scales_ptr, bias_ptr, out_ptr, weights_ptr, sorted_pair_ids_ptr,
                         block_expert_ptr, num_pairs, K, N,
                         stride_hm, stride_be, stride_br, stride_se, stride_sr, stride_bias, stride_om,
                         HAS_BIAS: tl.constexpr, FP32: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """out[pair, n] = weight[pair] * (h[sorted row] @ W2[e].T + b2[e]), scattered to the pair's own row."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(block_expert_ptr + pid_m)
        if expert < 0:
            return
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pair = tl.load(sorted_pair_ids_ptr + rows)
        row_mask = pair < num_pairs
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < N
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k_start in range(0, K, BLOCK_K):
            k = k_start + tl.arange(0, BLOCK_K)
            a = tl.load(h_ptr + rows[:, None] * stride_hm + k[None, :],
                        mask=row_mask[:, None] & (k[None, :] < K), other=0.0)
            w = _load_mxfp4_tile(blocks_ptr, scales_ptr, expert, n, n_mask, k_start, K,
                                 stride_be, stride_br, stride_se, stride_sr, BLOCK_N, BLOCK_K)
            acc += _dot(a, w, FP32)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + expert * stride_bias + n, mask=n_mask, other=0.0)[None, :]
        routing_weight = tl.load(weights_ptr + pair, mask=row_mask, other=0.0).to(tl.float32)
        acc = acc * routing_weight[:, None]
        tl.store(out_ptr + pair[:, None] * stride_om + n[None, :], acc, mask=row_mask[:, None] & n_mask[None, :])


@dataclass(frozen=True, slots=True)
class MoeTiles:
    block_m: int = 16
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 3

    @staticmethod
    def for_batch(num_pairs: int) -> "MoeTiles":
        """Decode batches hit each expert with a few rows; prefill with many. From `tools/tune_mxfp4.py` on
        an H100 with 32 experts, top-4, hidden = inter = 2880 (2026-11-22): 200 us at 1 token, 920 us at 64; every tile within ~10%
        of those, since the kernel is bound by its in-register FP4 decode, not by the tile shape."""
        if num_pairs <= 16:
            return MoeTiles(block_m=16, block_n=64, block_k=128, num_warps=8, num_stages=4)
        if num_pairs <= 256:
            return MoeTiles(block_m=16, block_n=32, block_k=128, num_warps=4, num_stages=3)
        return MoeTiles(block_m=64)


def mxfp4_moe_triton(x: torch.Tensor, w13: Mxfp4Linear, w2: Mxfp4Linear, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, activation: GatedActivation, tiles: MoeTiles | None = None,
                     skip_negative_ids: bool = False) -> torch.Tensor:
    """The same function as `mxfp4_moe_reference`, as two grouped W4A16 GEMMs. x is bf16 on the GPU; the
    interpreter (TRITON_INTERPRET=1) runs fp32/fp16 at small sizes."""
    if triton is None:
        raise RuntimeError("mxfp4_moe_triton needs the triton package")
    hidden, inter = x.shape[1], w2.in_features
    if w13.in_features != hidden or w13.out_features != 2 * inter or w2.out_features != hidden:
        raise ValueError(f"expert shapes do not chain: x [.., {hidden}], w13 [{w13.out_features}, "
                         f"{w13.in_features}], w2 [{w2.out_features}, {w2.in_features}]")
    x = x.contiguous()
    num_tokens, top_k = topk_ids.shape
    num_pairs = num_tokens * top_k
    tiles = tiles or MoeTiles.for_batch(num_pairs)
    align = align_by_expert_triton if x.is_cuda else align_by_expert_ref    # the same layout either way
    alignment = align(topk_ids, w13.blocks.shape[0], tiles.block_m)
    num_blocks = alignment.block_expert.numel()
    fp32 = x.dtype == torch.float32
    h = torch.empty(num_blocks * tiles.block_m, inter, dtype=x.dtype, device=x.device)
    dummy_bias = torch.empty(1, dtype=torch.float32, device=x.device)
    bias13 = w13.bias if w13.bias is not None else dummy_bias
    _moe_gate_up_kernel[(num_blocks, triton.cdiv(inter, tiles.block_n))](
        x, w13.blocks, w13.scales, bias13, h, alignment.sorted_pair_ids, alignment.block_expert,
        num_pairs, top_k, hidden, inter,
        x.stride(0), w13.blocks.stride(0), w13.blocks.stride(1), w13.scales.stride(0), w13.scales.stride(1),
        bias13.stride(0) if w13.bias is not None else 0, h.stride(0),
        activation.alpha, activation.limit or 0.0, activation.up_offset,
        HAS_BIAS=w13.bias is not None, HAS_LIMIT=activation.limit is not None,
        INTERLEAVED=activation.interleaved, FP32=fp32,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    # [tokens * k, hidden]; rows of left-out pairs (negative ids) are never written, so they start at zero
    pair_out = (torch.zeros if skip_negative_ids else torch.empty)(num_pairs, hidden, dtype=torch.float32,
                                                                   device=x.device)
    bias2 = w2.bias if w2.bias is not None else dummy_bias
    _moe_down_kernel[(num_blocks, triton.cdiv(hidden, tiles.block_n))](
        h, w2.blocks, w2.scales, bias2, pair_out, topk_weights.contiguous().flatten(),
        alignment.sorted_pair_ids, alignment.block_expert, num_pairs, inter, hidden,
        h.stride(0), w2.blocks.stride(0), w2.blocks.stride(1), w2.scales.stride(0), w2.scales.stride(1),
        bias2.stride(0) if w2.bias is not None else 0, pair_out.stride(0),
        HAS_BIAS=w2.bias is not None, FP32=fp32,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages)
    return pair_out.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)


# ---- decode GEMV ------------------------------------------------------------------------------------
# For a few tokens each token-expert pair reads its expert's weights once and nothing is worth a tensor-core
# tile: a GEMV that moves the packed bytes at the copy bandwidth needs a decode of a few integer operations
# per element. The bytes are read as int32 words, 8 E2M1 codes each (a 16-byte block = 4 words = 32
# elements sharing one scale), and code i of a word, `s e1 e0 m`, becomes the fp32 bit pattern with the
# sign at bit 31 and `e1 e0 m` at bits 24..22 (the low exponent bits and the top mantissa bit): a shift and
# a mask for each field. That pattern is the E2M1 value times 2^-126 in every case, the subnormal code 1
# landing on the fp32 subnormal 2^-127, exactly. The activations are scaled by 2^64 as they are loaded, so
# every product with a weight is a normal fp32 number (the FMA takes subnormal operands at full rate; the
# kernels are compiled without flush-to-zero) and one FMA per element accumulates; each block's sum is
# multiplied back by 2^62 and by its E8M0 scale. No conversion instruction, no table.
#
# GEMM 1: one program per (pair, BLOCK_N intermediate columns) reads its 2 * BLOCK_N gate/up rows and applies
# the gated activation; the intermediate is stored per pair (no sorting, no alignment pass).
# GEMM 2: one program per (token, BLOCK_N output columns) walks the token's k experts and their K steps as one
# sequence and sums the weighted rows in fp32, so the k-way sum needs no extra launch and is deterministic.
# Each program loads the next K step's words, activations and scales before decoding the current one.

if triton is not None:
    @triton.jit
    def _e2m1_times_2_pow_m126(words, NIBBLE: tl.constexpr):
        """Code NIBBLE (0 = lowest bits) of each int32 word -> its E2M1 value * 2^-126, as fp32."""
        magnitude = (words >> (4 * NIBBLE)) & 7
        sign = (words >> (4 * NIBBLE + 3)) & 1
        return ((magnitude << 22) | (sign << 31)).to(tl.float32, bitcast=True)

    @triton.jit
    def _split_by_word_position(xs, BLOCK_G: tl.constexpr):
        """[BLOCK_G, 32] activations -> eight [BLOCK_G, 4] tensors, the i-th holding element 8 * word + i."""
        # element 8 * word + 4 * b2 + 2 * b1 + b0: each split peels off the lowest remaining bit
        b0_0, b0_1 = tl.split(tl.reshape(xs, [BLOCK_G, 4, 2, 2, 2]))
        b1_00, b1_01 = tl.split(b0_0)
        b1_10, b1_11 = tl.split(b0_1)
        x0, x4 = tl.split(b1_00)
        x2, x6 = tl.split(b1_01)
        x1, x5 = tl.split(b1_10)
        x3, x7 = tl.split(b1_11)
        return x0, x1, x2, x3, x4, x5, x6, x7

    # The same eight patterns from one word in PTX, two codes at a time: codes i and i + 4 sit 16 bits apart,
    # so one shift-and-mask pair places both as bf16 patterns (halves of one register); widening a bf16
    # half to fp32 is one more shift or mask. About 3 integer operations per element instead of 4.
    _E2M1_PAIRS_PTX = tl.constexpr("""{
    .reg .b32 a, b, p;
    shl.b32 a, $8, 6;  and.b32 a, a, 0x01C001C0;  shl.b32 b, $8, 12;  and.b32 b, b, 0x80008000;  or.b32 p, a, b;
    shl.b32 $0, p, 16;  and.b32 $4, p, 0xFFFF0000;
    shl.b32 a, $8, 2;  and.b32 a, a, 0x01C001C0;  shl.b32 b, $8, 8;  and.b32 b, b, 0x80008000;  or.b32 p, a, b;
    shl.b32 $1, p, 16;  and.b32 $5, p, 0xFFFF0000;
    shr.b32 a, $8, 2;  and.b32 a, a, 0x01C001C0;  shl.b32 b, $8, 4;  and.b32 b, b, 0x80008000;  or.b32 p, a, b;
    shl.b32 $2, p, 16;  and.b32 $6, p, 0xFFFF0000;
    shr.b32 a, $8, 6;  and.b32 a, a, 0x01C001C0;  and.b32 b, $8, 0x80008000;  or.b32 p, a, b;
    shl.b32 $3, p, 16;  and.b32 $7, p, 0xFFFF0000;
    }""")

    @triton.jit
    def _add_slot_biases(out, bias_ptr, ids_ptr, weights_ptr, token, top_k, stride_bias, cols, mask):
        """out + sum over the token's slots of weight * bias[expert][cols] (a negative id: another rank's expert,
        nothing), the down projection's biases in fp32."""
        for slot in range(0, top_k):
            expert = tl.load(ids_ptr + token * top_k + slot).to(tl.int64)
            if expert >= 0:
                bias = tl.load(bias_ptr + expert * stride_bias + cols, mask=mask, other=0.0).to(tl.float32)
                out += bias * tl.load(weights_ptr + token * top_k + slot).to(tl.float32)
        return out

    @triton.jit
    def _mxfp4_gemv_step(words, xs, BLOCK_G: tl.constexpr, PTX_DECODE: tl.constexpr):
        """[ROWS, BLOCK_G, 4] packed words x [BLOCK_G, 32] scaled activations -> [ROWS, BLOCK_G] block sums."""
        x0, x1, x2, x3, x4, x5, x6, x7 = _split_by_word_position(xs, BLOCK_G)
        if PTX_DECODE:
            w0, w1, w2, w3, w4, w5, w6, w7 = tl.inline_asm_elementwise(
                _E2M1_PAIRS_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r", [words], dtype=(tl.float32,) * 8, is_pure=True,
                pack=1)
        else:
            w0 = _e2m1_times_2_pow_m126(words, 0)
            w1 = _e2m1_times_2_pow_m126(words, 1)
            w2 = _e2m1_times_2_pow_m126(words, 2)
            w3 = _e2m1_times_2_pow_m126(words, 3)
            w4 = _e2m1_times_2_pow_m126(words, 4)
            w5 = _e2m1_times_2_pow_m126(words, 5)
            w6 = _e2m1_times_2_pow_m126(words, 6)
            w7 = _e2m1_times_2_pow_m126(words, 7)
        sums = w0 * x0[None, :, :]
        sums += w1 * x1[None, :, :]
        sums += w2 * x2[None, :, :]
        sums += w3 * x3[None, :, :]
        sums += w4 * x4[None, :, :]
        sums += w5 * x5[None, :, :]
        sums += w6 * x6[None, :, :]
        sums += w7 * x7[None, :, :]
        return tl.sum(sums, axis=2)

    @triton.jit
    def _mxfp4_gemv_load(word_ptrs, x_ptrs, scale_ptrs, row_mask, g_start, num_groups, BLOCK_G: tl.constexpr):
        """One K step's operands: words [ROWS, BLOCK_G, 4] int32, activations [BLOCK_G, 32] fp32 * 2^64 and
        scale bytes [ROWS, BLOCK_G] int32 (zero past the row's end)."""
        group = g_start + tl.arange(0, BLOCK_G)
        group_mask = group < num_groups
        words = tl.load(word_ptrs + g_start * 4, mask=row_mask[:, None, None] & group_mask[None, :, None], other=0,
                        eviction_policy="evict_first")
        xs = tl.load(x_ptrs + g_start * 32, mask=group_mask[:, None], other=0.0).to(tl.float32)
        scale_bits = tl.load(scale_ptrs + g_start, mask=row_mask[:, None] & group_mask[None, :], other=0)
        return words, xs * 18446744073709551616.0, scale_bits.to(tl.int32)

    @triton.jit
    def _mxfp4_gemv_rows(x_row, words_ptr, scales_ptr, row_groups, row_scales, row_mask, K,
                         ROWS: tl.constexpr, BLOCK_G: tl.constexpr, PREFETCH: tl.constexpr, PTX_DECODE: tl.constexpr):
        """[ROWS] fp32 dot products of one activation row (pointer x_row, K elements) with weight rows whose
        first 16-byte block is row_groups [ROWS] (int64, counted in blocks) and first scale row_scales."""
        num_groups = K // 32
        g = tl.arange(0, BLOCK_G)
        word_ptrs = words_ptr + (row_groups[:, None, None] + g[None, :, None]) * 4 + tl.arange(0, 4)[None, None, :]
        x_ptrs = x_row + g[:, None] * 32 + tl.arange(0, 32)[None, :]                    # [BLOCK_G, 32]
        scale_ptrs = scales_ptr + row_scales[:, None] + g[None, :]                       # [ROWS, BLOCK_G]
        acc = tl.zeros([ROWS, BLOCK_G], dtype=tl.float32)
        if PREFETCH:
            words, xs, scale_bits = _mxfp4_gemv_load(word_ptrs, x_ptrs, scale_ptrs, row_mask, 0, num_groups, BLOCK_G)
        for g_start in range(0, num_groups, BLOCK_G):
            if PREFETCH:                     # the next step's operands are in flight while this one decodes
                next_words, next_xs, next_scale_bits = _mxfp4_gemv_load(word_ptrs, x_ptrs, scale_ptrs, row_mask,
                                                                        g_start + BLOCK_G, num_groups, BLOCK_G)
            else:
                words, xs, scale_bits = _mxfp4_gemv_load(word_ptrs, x_ptrs, scale_ptrs, row_mask, g_start,
                                                         num_groups, BLOCK_G)
            sums = _mxfp4_gemv_step(words, xs, BLOCK_G, PTX_DECODE)                      # x scaled by 2^64
            scale = (scale_bits << 23).to(tl.float32, bitcast=True)             # 2^(s - 127); s = 0 gives 0
            acc += (sums * 4611686018427387904.0) * scale                         # * 2^62 undoes 2^64 * 2^-126
            if PREFETCH:
                words, xs, scale_bits = next_words, next_xs, next_scale_bits
        return tl.sum(acc, axis=1)

    @triton.jit
    def _mxfp4_gemv_gate_up_kernel(x_ptr, words_ptr, scales_ptr, bias_ptr, h_ptr, ids_ptr, count_ptr, num_counts,
                                   top_k, K, N,
                                   stride_xm, stride_be, stride_br, stride_se, stride_sr, stride_bias, stride_hm,
                                   alpha, limit, up_offset,
                                   HAS_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr, INTERLEAVED: tl.constexpr,
                                   BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, PREFETCH: tl.constexpr,
                                   PTX_DECODE: tl.constexpr):
        """h[pair, n] = act(x[token] @ W13[e].T + b13[e]) for this program's BLOCK_N columns n. Weight strides
        (stride_be, stride_br) count 16-byte blocks. Program (0, 0) also zeroes num_counts int32 counters at
        count_ptr (the split down GEMV's, which runs next)."""
        if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
            for c in range(0, num_counts, 256):
                tl.store(count_ptr + c + tl.arange(0, 256), 0, mask=c + tl.arange(0, 256) < num_counts)
        pair = tl.program_id(0)
        token = pair // top_k
        expert = tl.load(ids_ptr + pair).to(tl.int64)    # negative: another rank's expert, nothing to read
        r = tl.arange(0, 2 * BLOCK_N)
        n0 = tl.program_id(1) * BLOCK_N
        if INTERLEAVED:                                  # rows 2n (gate), 2n + 1 (up): one contiguous run
            rows = 2 * n0 + r
            n_of_row = n0 + r // 2
        else:                                            # gate rows n, then up rows N + n
            n_of_row = n0 + r % BLOCK_N
            rows = n_of_row + (r // BLOCK_N) * N
        row_mask = (n_of_row < N) & ((n_of_row * 0 + expert) >= 0)
        expert = tl.maximum(expert, 0)
        acc = _mxfp4_gemv_rows(x_ptr + token.to(tl.int64) * stride_xm, words_ptr, scales_ptr,
                               expert * stride_be + rows.to(tl.int64) * stride_br,
                               expert * stride_se + rows.to(tl.int64) * stride_sr, row_mask, K,
                               2 * BLOCK_N, BLOCK_G, PREFETCH, PTX_DECODE)         # [2 * BLOCK_N]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + expert * stride_bias + rows, mask=row_mask, other=0.0).to(tl.float32)
        if INTERLEAVED:
            gate, up = tl.split(tl.reshape(acc, [BLOCK_N, 2]))
        else:
            gate, up = tl.split(tl.permute(tl.reshape(acc, [2, BLOCK_N]), (1, 0)))
        if HAS_LIMIT:
            gate = tl.minimum(gate, limit)
            up = tl.minimum(tl.maximum(up, -limit), limit)
        h = gate * tl.sigmoid(alpha * gate) * (up + up_offset)
        n = n0 + tl.arange(0, BLOCK_N)
        tl.store(h_ptr + pair * stride_hm + n, h.to(h_ptr.dtype.element_ty), mask=n < N)

    @triton.jit
    def _mxfp4_gemv_down_load(h_ptr, words_ptr, scales_ptr, weights_ptr, ids_ptr, token, step, steps, top_k,
                              n, n_mask, num_groups, stride_hm, stride_be, stride_br, stride_se, stride_sr,
                              BLOCK_G: tl.constexpr):
        """Operands of step `step` of the down GEMV's walk: slot step // steps, K step step % steps. Steps past
        the last slot, and slots of another rank's expert, load nothing (their weight is 0)."""
        slot = step // steps
        g_start = (step % steps) * BLOCK_G
        pair = token * top_k + tl.minimum(slot, top_k - 1)
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        valid = (slot < top_k) & (expert >= 0)
        row_mask = n_mask & ((n * 0 + slot) < top_k) & ((n * 0 + expert) >= 0)
        expert = tl.maximum(expert, 0)
        g = tl.arange(0, BLOCK_G)
        row_groups = expert * stride_be + n.to(tl.int64) * stride_br
        word_ptrs = words_ptr + (row_groups[:, None, None] + g[None, :, None]) * 4 + tl.arange(0, 4)[None, None, :]
        x_ptrs = h_ptr + pair.to(tl.int64) * stride_hm + g[:, None] * 32 + tl.arange(0, 32)[None, :]
        scale_ptrs = scales_ptr + (expert * stride_se + n.to(tl.int64) * stride_sr)[:, None] + g[None, :]
        words, xs, scale_bits = _mxfp4_gemv_load(word_ptrs, x_ptrs, scale_ptrs, row_mask, g_start,
                                                 num_groups, BLOCK_G)
        weight = tl.where(valid, tl.load(weights_ptr + pair).to(tl.float32), 0.0)
        return words, xs, scale_bits, weight

    @triton.jit
    def _mxfp4_gemv_down_kernel(h_ptr, words_ptr, scales_ptr, bias_ptr, out_ptr, weights_ptr, ids_ptr,
                                top_k, K, N, stride_hm, stride_be, stride_br, stride_se, stride_sr, stride_bias,
                                stride_om, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                                BLOCK_G: tl.constexpr, PREFETCH: tl.constexpr, PTX_DECODE: tl.constexpr):
        """out[token, n] = sum_k weight[pair] * (h[pair] @ W2[e].T + b2[e])[n], pair = token * top_k + k. The
        token's k experts and their K steps form one walk, so the prefetch runs across expert boundaries;
        the routing weight is folded into each block's scale (a power of two times the weight: exact)."""
        token = tl.program_id(0)
        n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = n < N
        num_groups = K // 32
        steps = tl.cdiv(num_groups, BLOCK_G)
        acc = tl.zeros([BLOCK_N, BLOCK_G], dtype=tl.float32)
        if PREFETCH:
            words, xs, scale_bits, weight = _mxfp4_gemv_down_load(
                h_ptr, words_ptr, scales_ptr, weights_ptr, ids_ptr, token, 0, steps, top_k, n, n_mask, num_groups,
                stride_hm, stride_be, stride_br, stride_se, stride_sr, BLOCK_G)
        for step in range(0, top_k * steps):
            if PREFETCH:
                next_words, next_xs, next_scale_bits, next_weight = _mxfp4_gemv_down_load(
                    h_ptr, words_ptr, scales_ptr, weights_ptr, ids_ptr, token, step + 1, steps, top_k, n, n_mask,
                    num_groups, stride_hm, stride_be, stride_br, stride_se, stride_sr, BLOCK_G)
            else:
                words, xs, scale_bits, weight = _mxfp4_gemv_down_load(
                    h_ptr, words_ptr, scales_ptr, weights_ptr, ids_ptr, token, step, steps, top_k, n, n_mask,
                    num_groups, stride_hm, stride_be, stride_br, stride_se, stride_sr, BLOCK_G)
            sums = _mxfp4_gemv_step(words, xs, BLOCK_G, PTX_DECODE)
            scale = (scale_bits << 23).to(tl.float32, bitcast=True) * weight
            acc += (sums * 4611686018427387904.0) * scale
            if PREFETCH:
                words, xs, scale_bits, weight = next_words, next_xs, next_scale_bits, next_weight
        out = tl.sum(acc, axis=1)
        if HAS_BIAS:
            out = _add_slot_biases(out, bias_ptr, ids_ptr, weights_ptr, token, top_k, stride_bias, n, n_mask)
        tl.store(out_ptr + token * stride_om + n, out.to(out_ptr.dtype.element_ty), mask=n_mask)


# ---- decode GEMV with explicit layouts (Gluon, GPU only) --------------------------------------------
# The same GEMVs with every register layout chosen by hand (Triton's Gluon dialect), so the K loop has no
# layout conversion, no shared memory and no barrier. L3 = [rows, GV, 4]: each thread holds whole 16-byte
# blocks (4 words, 32 codes) of R rows, one block per lane along K (GV blocks a step), the warps (and R)
# along the rows. The activations of a block are loaded once per thread (64-bit loads in the slice of L3
# without its row dimension) and shared by the thread's R rows; the scales are loaded straight into the
# slice without the word dimension. The lanes' partial sums are reduced once, after the loop. Numerics are
# those of the Triton kernels above (the same decode, the same 2^64 / 2^62 scaling, fp32 sums).

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
except ImportError:                                    # older Triton: the Triton kernels only
    gluon = None

if gluon is not None:
    _cta_barrier = getattr(gl, "thread_barrier", None) or gl.barrier       # renamed after Triton 3.6

if gluon is not None:
    @gluon.jit
    def _gl_unpack(v, X_PACKED: gl.constexpr):
        """int64 [GV, 4] -> its activations as fp32 times 2^64: four bf16 (X_PACKED 1) or fp16 (2)."""
        lo = v.to(gl.int32)
        hi = (v >> 32).to(gl.int32)
        if X_PACKED == 1:
            a = (lo << 16).to(gl.float32, bitcast=True)
            b = (lo & -65536).to(gl.float32, bitcast=True)
            c = (hi << 16).to(gl.float32, bitcast=True)
            d = (hi & -65536).to(gl.float32, bitcast=True)
        else:
            a = lo.to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
            b = (lo >> 16).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
            c = hi.to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
            d = (hi >> 16).to(gl.int16).to(gl.float16, bitcast=True).to(gl.float32)
        return (gl.expand_dims(a * 18446744073709551616.0, 0), gl.expand_dims(b * 18446744073709551616.0, 0),
                gl.expand_dims(c * 18446744073709551616.0, 0), gl.expand_dims(d * 18446744073709551616.0, 0))

    @gluon.jit
    def _gl_unpack_f32(v):
        """int64 [GV, 4] holding two fp32 -> both times 2^64, as [1, GV, 4]."""
        a = v.to(gl.int32).to(gl.float32, bitcast=True) * 18446744073709551616.0
        b = (v >> 32).to(gl.int32).to(gl.float32, bitcast=True) * 18446744073709551616.0
        return gl.expand_dims(a, 0), gl.expand_dims(b, 0)

    @gluon.jit
    def _gl_activations(xa, xb, xc, xd, X_PACKED: gl.constexpr):
        """The 8 activations of each word (element 8 * word + i), fp32 * 2^64, each [1, GV, 4]."""
        if X_PACKED == 0:
            x0, x1 = _gl_unpack_f32(xa)
            x2, x3 = _gl_unpack_f32(xb)
            x4, x5 = _gl_unpack_f32(xc)
            x6, x7 = _gl_unpack_f32(xd)
        else:
            x0, x1, x2, x3 = _gl_unpack(xa, X_PACKED)
            x4, x5, x6, x7 = _gl_unpack(xb, X_PACKED)
        return x0, x1, x2, x3, x4, x5, x6, x7

    # One word's dot product with its 8 activations (fp32 * 2^64) in PTX, the decoded weights never leaving
    # the asm block: codes i and i + 4 (16 bits apart) become a bf16 pair by a mask, a multiply that places
    # magnitude and sign at once (x * (2^6 + 2^12) for nibble 0, x * (2^2 + 2^8) for nibble 1; the fields do not
    # overlap, so the product is the sum of the two shifts) and a mask; the word shifted right by 8 gives codes
    # 2, 3, 6, 7 the same way. Each half widens to fp32 by a shift or a mask, then one FMA per weight. That is
    # 21 integer operations per 8 weights (the Triton kernels' pairs take 24) and 8 FMAs.
    _E2M1_DOT_PTX = gl.constexpr("""{
    .reg .b32 t, p, v;
    .reg .f32 lo, hi, s;
    and.b32 t, $1, 0x000F000F;  mul.lo.u32 p, t, 4160;  and.b32 p, p, 0x81C081C0;
    shl.b32 lo, p, 16;  and.b32 hi, p, 0xFFFF0000;
    mul.rn.f32 s, lo, $2;  fma.rn.f32 s, hi, $6, s;
    and.b32 t, $1, 0x00F000F0;  mul.lo.u32 p, t, 260;  and.b32 p, p, 0x81C081C0;
    shl.b32 lo, p, 16;  and.b32 hi, p, 0xFFFF0000;
    fma.rn.f32 s, lo, $3, s;  fma.rn.f32 s, hi, $7, s;
    shr.b32 v, $1, 8;
    and.b32 t, v, 0x000F000F;  mul.lo.u32 p, t, 4160;  and.b32 p, p, 0x81C081C0;
    shl.b32 lo, p, 16;  and.b32 hi, p, 0xFFFF0000;
    fma.rn.f32 s, lo, $4, s;  fma.rn.f32 s, hi, $8, s;
    and.b32 t, v, 0x00F000F0;  mul.lo.u32 p, t, 260;  and.b32 p, p, 0x81C081C0;
    shl.b32 lo, p, 16;  and.b32 hi, p, 0xFFFF0000;
    fma.rn.f32 s, lo, $5, s;  fma.rn.f32 $0, hi, $9, s;
    }""")

    @gluon.jit
    def _gl_block_sums(words, x0, x1, x2, x3, x4, x5, x6, x7, scale_bits, weight):
        """[R, GV] block sums of words [R, GV, 4] with the activations ([1, GV, 4] each), times 2^62, the E8M0
        scale bits [R, GV] and `weight`."""
        sums = gl.inline_asm_elementwise(_E2M1_DOT_PTX, "=f,r,f,f,f,f,f,f,f,f", [words, x0, x1, x2, x3, x4, x5, x6, x7],
                                         dtype=gl.float32, is_pure=True, pack=1)
        scale = (scale_bits << 23).to(gl.float32, bitcast=True) * (weight * 4611686018427387904.0)
        return gl.sum(sums, axis=2) * scale

    @gluon.constexpr_function
    def _gl_layout(rows, gv, num_warps):
        """L3 for [rows, gv, 4]: a lane per block along K (gv <= 32), the rest of the warp and the warps along
        the rows."""
        return gl.BlockedLayout([1, 1, 4], [32 // gv, gv, 1], [num_warps, 1, 1], [2, 1, 0])

    @gluon.jit
    def _gl_x_load(x_vec, g_start, num_groups, X_PACKED: gl.constexpr, GV: gl.constexpr, L3: gl.constexpr):
        """The K step's activations: int64 [GV, 4] (two per word for 16-bit activations, four for fp32)."""
        XL: gl.constexpr = gl.SliceLayout(0, L3)
        g = g_start + gl.arange(0, GV, layout=gl.SliceLayout(1, XL))
        mask = gl.expand_dims(g < num_groups, 1) & gl.expand_dims(gl.arange(0, 4, layout=gl.SliceLayout(0, XL)) < 4, 0)
        step = x_vec + g_start * (16 if X_PACKED == 0 else 8)
        xa = gl.load(step, mask=mask, other=0)
        xb = gl.load(step + 1, mask=mask, other=0)
        if X_PACKED == 0:
            xc = gl.load(step + 2, mask=mask, other=0)
            xd = gl.load(step + 3, mask=mask, other=0)
        else:
            xc = xa
            xd = xb
        return xa, xb, xc, xd

    @gluon.jit
    def _gl_x_ptrs(x_row, X_PACKED: gl.constexpr, GV: gl.constexpr, L3: gl.constexpr):
        XL: gl.constexpr = gl.SliceLayout(0, L3)
        g = gl.arange(0, GV, layout=gl.SliceLayout(1, XL))
        j = gl.arange(0, 4, layout=gl.SliceLayout(0, XL))
        per_word: gl.constexpr = 4 if X_PACKED == 0 else 2
        return x_row.to(gl.pointer_type(gl.int64)) + gl.expand_dims(g * (4 * per_word), 1) + gl.expand_dims(
            j * per_word, 0)

    @gluon.jit
    def _gl_w_ptrs(words_ptr, scales_ptr, row_groups, row_scales, GV: gl.constexpr, L3: gl.constexpr):
        """Word pointers [R, GV, 4] and scale pointers [R, GV] of K step 0 for rows whose first block is
        row_groups [R] (int64, in blocks; layout slice(1, slice(2, L3))) and first scale row_scales."""
        SL: gl.constexpr = gl.SliceLayout(2, L3)
        g = gl.arange(0, GV, layout=gl.SliceLayout(0, SL))
        j = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(1, L3)))
        blocks = gl.expand_dims(row_groups, 1) + gl.expand_dims(g, 0)                     # [R, GV]
        word_ptrs = words_ptr + gl.expand_dims(blocks * 4, 2) + gl.expand_dims(gl.expand_dims(j, 0), 1)
        scale_ptrs = scales_ptr + gl.expand_dims(row_scales, 1) + gl.expand_dims(g, 0)
        return word_ptrs, scale_ptrs

    @gluon.jit
    def _gl_w_load(word_ptrs, scale_ptrs, row_mask, g_start, num_groups, GV: gl.constexpr, L3: gl.constexpr):
        SL: gl.constexpr = gl.SliceLayout(2, L3)
        g = g_start + gl.arange(0, GV, layout=gl.SliceLayout(0, SL))
        mask = gl.expand_dims(row_mask, 1) & gl.expand_dims(g < num_groups, 0)               # [R, GV]
        words = gl.load(word_ptrs + g_start * 4, mask=gl.expand_dims(mask, 2), other=0, eviction_policy="evict_first")
        scale_bits = gl.load(scale_ptrs + g_start, mask=mask, other=0).to(gl.int32)
        return words, scale_bits

    @gluon.jit
    def _gl_gate_up_kernel(x_ptr, words_ptr, scales_ptr, bias_ptr, h_ptr, ids_ptr, count_ptr, num_counts, top_k, K, N,
                           stride_xm, stride_be, stride_br, stride_se, stride_sr, stride_bias, stride_hm,
                           alpha, limit, up_offset,
                           HAS_BIAS: gl.constexpr, HAS_LIMIT: gl.constexpr, INTERLEAVED: gl.constexpr,
                           BLOCK_N: gl.constexpr, GV: gl.constexpr, X_PACKED: gl.constexpr, NUM_WARPS: gl.constexpr):
        """`_mxfp4_gemv_gate_up_kernel` with explicit layouts: the gate and the up rows of BLOCK_N columns as two
        row sets sharing each K step's activations. Program (0, 0) zeroes the split down GEMV's counters."""
        L3: gl.constexpr = _gl_layout(BLOCK_N, GV, NUM_WARPS)
        RL: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, L3))
        if (gl.program_id(0) == 0) & (gl.program_id(1) == 0):
            CL: gl.constexpr = gl.BlockedLayout([1], [32], [NUM_WARPS], [0])
            for c in range(0, num_counts, 32 * NUM_WARPS):
                offsets = c + gl.arange(0, 32 * NUM_WARPS, layout=CL)
                gl.store(count_ptr + offsets, gl.zeros([32 * NUM_WARPS], gl.int32, layout=CL),
                         mask=offsets < num_counts)
        pair = gl.program_id(0)
        token = pair // top_k
        expert = gl.load(ids_ptr + pair).to(gl.int64)
        n = gl.program_id(1) * BLOCK_N + gl.arange(0, BLOCK_N, layout=RL)
        row_mask = (n < N) & ((n * 0 + expert) >= 0)
        expert = gl.maximum(expert, 0)
        if INTERLEAVED:
            gate_rows, up_rows = 2 * n, 2 * n + 1
        else:
            gate_rows, up_rows = n, n + N
        num_groups = K // 32
        x_vec = _gl_x_ptrs(x_ptr + token.to(gl.int64) * stride_xm, X_PACKED, GV, L3)
        gate_ptrs, gate_scale_ptrs = _gl_w_ptrs(words_ptr, scales_ptr,
                                                expert * stride_be + gate_rows.to(gl.int64) * stride_br,
                                                expert * stride_se + gate_rows.to(gl.int64) * stride_sr, GV, L3)
        up_ptrs, up_scale_ptrs = _gl_w_ptrs(words_ptr, scales_ptr, expert * stride_be + up_rows.to(gl.int64) * stride_br,
                                            expert * stride_se + up_rows.to(gl.int64) * stride_sr, GV, L3)
        acc_gate = gl.zeros([BLOCK_N, GV], gl.float32, layout=gl.SliceLayout(2, L3))
        acc_up = gl.zeros([BLOCK_N, GV], gl.float32, layout=gl.SliceLayout(2, L3))
        gate_words, gate_scales = _gl_w_load(gate_ptrs, gate_scale_ptrs, row_mask, 0, num_groups, GV, L3)
        up_words, up_scales = _gl_w_load(up_ptrs, up_scale_ptrs, row_mask, 0, num_groups, GV, L3)
        xa, xb, xc, xd = _gl_x_load(x_vec, 0, num_groups, X_PACKED, GV, L3)
        for g_start in range(0, num_groups, GV):               # the next step's operands load during this one
            next_gate_words, next_gate_scales = _gl_w_load(gate_ptrs, gate_scale_ptrs, row_mask, g_start + GV,
                                                           num_groups, GV, L3)
            next_up_words, next_up_scales = _gl_w_load(up_ptrs, up_scale_ptrs, row_mask, g_start + GV, num_groups,
                                                       GV, L3)
            next_xa, next_xb, next_xc, next_xd = _gl_x_load(x_vec, g_start + GV, num_groups, X_PACKED, GV, L3)
            x0, x1, x2, x3, x4, x5, x6, x7 = _gl_activations(xa, xb, xc, xd, X_PACKED)
            acc_gate += _gl_block_sums(gate_words, x0, x1, x2, x3, x4, x5, x6, x7, gate_scales, 1.0)
            acc_up += _gl_block_sums(up_words, x0, x1, x2, x3, x4, x5, x6, x7, up_scales, 1.0)
            gate_words, gate_scales = next_gate_words, next_gate_scales
            up_words, up_scales = next_up_words, next_up_scales
            xa, xb, xc, xd = next_xa, next_xb, next_xc, next_xd
        gate = gl.sum(acc_gate, axis=1)
        up = gl.sum(acc_up, axis=1)
        n_mask = n < N
        if HAS_BIAS:
            gate += gl.load(bias_ptr + expert * stride_bias + gate_rows, mask=n_mask, other=0.0).to(gl.float32)
            up += gl.load(bias_ptr + expert * stride_bias + up_rows, mask=n_mask, other=0.0).to(gl.float32)
        if HAS_LIMIT:
            gate = gl.minimum(gate, limit)
            up = gl.minimum(gl.maximum(up, -limit), limit)
        h = gate / (1.0 + gl.exp(-alpha * gate)) * (up + up_offset)
        gl.store(h_ptr + pair * stride_hm + n, h.to(h_ptr.dtype.element_ty), mask=n_mask)

    @gluon.jit
    def _gl_down_load(h_ptr, words_ptr, scales_ptr, weights_ptr, ids_ptr, token, step, steps, slot_end, top_k, n,
                      n_mask, num_groups, stride_hm, stride_be, stride_br, stride_se, stride_sr, GV: gl.constexpr,
                      X_PACKED: gl.constexpr, L3: gl.constexpr):
        """The operands of step `step` of the down GEMV's walk (slot step // steps, K step step % steps); slots
        from slot_end on, and another rank's experts, load nothing (their weight is 0)."""
        slot = step // steps
        g_start = (step % steps) * GV
        pair = token * top_k + gl.minimum(slot, top_k - 1)
        expert = gl.load(ids_ptr + pair).to(gl.int64)
        valid = (slot < slot_end) & (expert >= 0)
        row_mask = n_mask & ((n * 0 + slot) < slot_end) & ((n * 0 + expert) >= 0)
        expert = gl.maximum(expert, 0)
        word_ptrs, scale_ptrs = _gl_w_ptrs(words_ptr, scales_ptr, expert * stride_be + n.to(gl.int64) * stride_br,
                                           expert * stride_se + n.to(gl.int64) * stride_sr, GV, L3)
        words, scale_bits = _gl_w_load(word_ptrs, scale_ptrs, row_mask, g_start, num_groups, GV, L3)
        x_vec = _gl_x_ptrs(h_ptr + pair.to(gl.int64) * stride_hm, X_PACKED, GV, L3)
        xa, xb, xc, xd = _gl_x_load(x_vec, g_start, num_groups, X_PACKED, GV, L3)
        weight = gl.where(valid, gl.load(weights_ptr + pair).to(gl.float32), 0.0)
        return words, scale_bits, xa, xb, xc, xd, weight

    @gluon.jit
    def _gl_down_kernel(h_ptr, words_ptr, scales_ptr, bias_ptr, out_ptr, weights_ptr, ids_ptr, part_ptr, count_ptr,
                        top_k, K, N, stride_hm, stride_be, stride_br, stride_se, stride_sr, stride_bias, stride_om,
                        HAS_BIAS: gl.constexpr, BLOCK_N: gl.constexpr, GV: gl.constexpr, X_PACKED: gl.constexpr,
                        SPLIT: gl.constexpr, NUM_WARPS: gl.constexpr):
        """`_mxfp4_gemv_down_kernel` with explicit layouts. With SPLIT > 1 the token's slots are divided among
        SPLIT programs (more programs, shorter walks); each writes its fp32 partial and the last to arrive at
        the column tile's counter (int32, zero before the launch, zero again after it) sums them in a fixed
        order: deterministic."""
        L3: gl.constexpr = _gl_layout(BLOCK_N, GV, NUM_WARPS)
        RL: gl.constexpr = gl.SliceLayout(1, gl.SliceLayout(2, L3))
        token = gl.program_id(0)
        pid_n = gl.program_id(1)
        split = gl.program_id(2)
        n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, layout=RL)
        n_mask = n < N
        num_groups = K // 32
        steps = gl.cdiv(num_groups, GV)
        slots_per_split = gl.cdiv(top_k, SPLIT)
        slot_begin = split * slots_per_split
        slot_end = gl.minimum(slot_begin + slots_per_split, top_k)
        acc = gl.zeros([BLOCK_N, GV], gl.float32, layout=gl.SliceLayout(2, L3))
        words, scale_bits, xa, xb, xc, xd, weight = _gl_down_load(
            h_ptr, words_ptr, scales_ptr, weights_ptr, ids_ptr, token, slot_begin * steps, steps, slot_end, top_k, n,
            n_mask, num_groups, stride_hm, stride_be, stride_br, stride_se, stride_sr, GV, X_PACKED, L3)
        for step in range(slot_begin * steps, slot_end * steps):
            next_words, next_scale_bits, next_xa, next_xb, next_xc, next_xd, next_weight = _gl_down_load(
                h_ptr, words_ptr, scales_ptr, weights_ptr, ids_ptr, token, step + 1, steps, slot_end, top_k, n,
                n_mask, num_groups, stride_hm, stride_be, stride_br, stride_se, stride_sr, GV, X_PACKED, L3)
            x0, x1, x2, x3, x4, x5, x6, x7 = _gl_activations(xa, xb, xc, xd, X_PACKED)
            acc += _gl_block_sums(words, x0, x1, x2, x3, x4, x5, x6, x7, scale_bits, weight)
            words, scale_bits, xa, xb, xc, xd, weight = (next_words, next_scale_bits, next_xa, next_xb, next_xc,
                                                         next_xd, next_weight)
        out = gl.sum(acc, axis=1)
        if SPLIT > 1:
            gl.store(part_ptr + (split * gl.num_programs(0) + token).to(gl.int64) * N + n, out, mask=n_mask)
            _cta_barrier()                                       # every thread's partial before the arrival
            count = count_ptr + token * gl.num_programs(1) + pid_n
            arrived = gl.atomic_add(count, 1, sem="acq_rel", scope="gpu")
            if arrived == SPLIT - 1:
                out = gl.zeros([BLOCK_N], gl.float32, layout=RL)
                for other in range(0, SPLIT):
                    out += gl.load(part_ptr + (other * gl.num_programs(0) + token).to(gl.int64) * N + n, mask=n_mask,
                                   other=0.0, cache_modifier=".cg")
                _gl_down_store(out, bias_ptr, out_ptr, weights_ptr, ids_ptr, token, top_k, n, n_mask, stride_bias,
                               stride_om, HAS_BIAS)
                gl.store(count, 0)                               # left at zero for a caller that keeps them
        else:
            _gl_down_store(out, bias_ptr, out_ptr, weights_ptr, ids_ptr, token, top_k, n, n_mask, stride_bias,
                           stride_om, HAS_BIAS)

    @gluon.jit
    def _gl_down_store(out, bias_ptr, out_ptr, weights_ptr, ids_ptr, token, top_k, n, n_mask, stride_bias, stride_om,
                       HAS_BIAS: gl.constexpr):
        """The token's row: out plus the weighted biases of its experts, in the output's dtype."""
        if HAS_BIAS:
            for slot in range(0, top_k):
                expert = gl.load(ids_ptr + token * top_k + slot).to(gl.int64)
                if expert >= 0:
                    bias = gl.load(bias_ptr + expert * stride_bias + n, mask=n_mask, other=0.0).to(gl.float32)
                    out += bias * gl.load(weights_ptr + token * top_k + slot).to(gl.float32)
        gl.store(out_ptr + token * stride_om + n, out.to(out_ptr.dtype.element_ty), mask=n_mask)


# ---- decode GEMV on the tensor cores (mma.sync, GPU; the interpreter runs an emulation) ----------------
# The K-reduction of both GEMVs runs on the tensor cores (mma.sync m16n8k16, bf16 in, fp32 sums), as in
# runtime/ops/fp8.py's tensor-core GEMV: lane (g, c) = (lane // 4, lane % 4) of warp w holds rows g and g + 8
# of the warp's 16-row tile, and at each K step loads one whole 16-byte block (32 codes, one E8M0 scale) of each
# of the two rows: block 4 * step + c, so the 4 lanes of a row read 64 contiguous bytes. A word's 8 codes give
# four bf16 pairs (codes 0 and 4, 1 and 5, 2 and 6, 3 and 7; 16 bits apart, placed by the multiply of the
# Gluon kernels) worth E2M1 * 2^-126 (code 1 is the bf16 subnormal 2^-127, exact); one mul.bf16x2 by the block's
# scale 2^(s - 1 - MMA_SCALE_SHIFT) makes them the weights times 2^-MMA_SCALE_SHIFT, normal bf16 and exact for
# E8M0 scales in [MMA_SCALE_SHIFT, 128 + MMA_SCALE_SHIFT] (block maxima 2^-107 .. 2^21 * 6). The pairs of word j
# are the A fragments of two mma (the K order inside an mma is free: the activations are permuted to match,
# by prmt), so an mma sums 4 lanes' blocks, each already scaled. B is the activation row (bf16, as loaded, in
# every column: all 8 columns are the same token and the sums of column 0 are kept). No shared memory, barrier
# or shuffle in the loop; the next step's operands load while this one computes. A K split writes fp32
# partials and the last program to arrive at the tile's counter finishes (fixed order: deterministic) and
# resets the counter, so the counters stay zero between launches (`_mma_counters`).

MMA_SCALE_SHIFT = 20

if triton is not None:
    def _mxfp4_mma_ptx() -> str:
        """The PTX of one K step of a lane: operands $4-$7 / $8-$11 the words of rows g / g + 8, $12 / $13 their
        scale bytes, $16 + 4q .. $19 + 4q the activation words of word q, $32-$35 the sums in, $0-$3 out."""
        scale_bias = (126 - MMA_SCALE_SHIFT) * 0x00800080          # m = 2^(s - 1 - shift) in both bf16 halves
        lines = [".reg .b32 t, v, m0, m1, p0, p1, p2, p3, q0, q1, q2, q3, b0, b1, b2, b3;",
                 f"mad.lo.u32 m0, $12, 0x00800080, {scale_bias};  mad.lo.u32 m1, $13, 0x00800080, {scale_bias};"]
        for q in range(4):
            for word, m, pairs in ((f"${4 + q}", "m0", "p"), (f"${8 + q}", "m1", "q")):
                for index, (src_reg, mask, times) in enumerate(((word, "0x000F000F", 4160), (word, "0x00F000F0", 260),
                                                                ("v", "0x000F000F", 4160), ("v", "0x00F000F0", 260))):
                    if index == 2:
                        lines.append(f"shr.b32 v, {word}, 8;")
                    lines.append(f"and.b32 t, {src_reg}, {mask};  mul.lo.u32 t, t, {times};  "
                                 f"and.b32 t, t, 0x81C081C0;  mul.rn.bf16x2 {pairs}{index}, t, {m};")
            x0, x1, x2, x3 = (f"${16 + 4 * q + k}" for k in range(4))
            lines.append(f"prmt.b32 b0, {x0}, {x2}, 0x5410;  prmt.b32 b1, {x0}, {x2}, 0x7632;")
            lines.append(f"prmt.b32 b2, {x1}, {x3}, 0x5410;  prmt.b32 b3, {x1}, {x3}, 0x7632;")
            acc = "{$32, $33, $34, $35}" if q == 0 else "{$0, $1, $2, $3}"
            lines.append("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {p0, q0, p1, q1}, "
                         f"{{b0, b1}}, {acc};")
            lines.append("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0, $1, $2, $3}, {p2, q2, p3, q3}, "
                         "{b2, b3}, {$0, $1, $2, $3};")
        return "{\n" + "\n".join(lines) + "\n}"

    _MXFP4_MMA_PTX = tl.constexpr(_mxfp4_mma_ptx())
    _MMA_SCALE_BIAS = tl.constexpr(126 - MMA_SCALE_SHIFT)           # E8M0 s -> 2^(s - 1 - shift): (s + this) << 23
    _MMA_UNSHIFT = tl.constexpr(float(2 ** MMA_SCALE_SHIFT))
    _MXFP4_MMA_CONSTRAINTS = tl.constexpr(",".join(["=&r"] * 4 + ["r"] * 32))     # early clobber: D chains in place

    @triton.jit
    def _mxfp4_mma_emulated(w_lo, w_hi, scales, xa, xb, xc, xd, acc):
        """`_MXFP4_MMA_PTX`'s function in Triton ops (the interpreter): acc [32 W, 4] plus, in elements 0-1 /
        2-3, the sums over a row group's 4 lanes of rows g / g + 8 times the activations."""
        lanes: tl.constexpr = acc.shape[0]
        j = tl.arange(0, 4)[None, :]
        shift = (scales + _MMA_SCALE_BIAS) << 23                             # 2^(s - 1 - shift) as fp32 bits
        m_lo = tl.sum(tl.where(j == 0, shift, 0), axis=1).to(tl.float32, bitcast=True)[:, None]
        m_hi = tl.sum(tl.where(j == 1, shift, 0), axis=1).to(tl.float32, bitcast=True)[:, None]
        dot_lo = tl.zeros([lanes, 4], dtype=tl.float32)
        dot_hi = tl.zeros([lanes, 4], dtype=tl.float32)
        for k in tl.static_range(4):        # activation words 2k: elements 2k, 2k + 1 of word j (from x tensor j)
            col = tl.where(j == 0, tl.sum(tl.where(j == k, xa, 0), axis=1)[:, None],
                           tl.where(j == 1, tl.sum(tl.where(j == k, xb, 0), axis=1)[:, None],
                                    tl.where(j == 2, tl.sum(tl.where(j == k, xc, 0), axis=1)[:, None],
                                             tl.sum(tl.where(j == k, xd, 0), axis=1)[:, None])))
            x_even = (col << 16).to(tl.float32, bitcast=True)
            x_odd = (col & -65536).to(tl.float32, bitcast=True)
            dot_lo += _e2m1_times_2_pow_m126(w_lo, 2 * k) * m_lo * x_even
            dot_lo += _e2m1_times_2_pow_m126(w_lo, 2 * k + 1) * m_lo * x_odd
            dot_hi += _e2m1_times_2_pow_m126(w_hi, 2 * k) * m_hi * x_even
            dot_hi += _e2m1_times_2_pow_m126(w_hi, 2 * k + 1) * m_hi * x_odd
        # a row's sum adds its 4 lanes' (consecutive) partial dots
        row_lo = tl.reshape(tl.sum(tl.reshape(tl.sum(dot_lo, axis=1), [lanes // 4, 4]), axis=1), [lanes // 4, 1])
        row_hi = tl.reshape(tl.sum(tl.reshape(tl.sum(dot_hi, axis=1), [lanes // 4, 4]), axis=1), [lanes // 4, 1])
        lane_lo = tl.reshape(tl.broadcast_to(row_lo, [lanes // 4, 4]), [lanes])[:, None]
        lane_hi = tl.reshape(tl.broadcast_to(row_hi, [lanes // 4, 4]), [lanes])[:, None]
        return acc + tl.where(j < 2, lane_lo, lane_hi)

    @triton.jit
    def _mxfp4_mma_block(lanes: tl.constexpr, step, num_groups):
        """[32 W, 1]: the block (4 * step + c) lane c of a row group reads at K step `step`, clamped to the row,
        and whether it lies in the row."""
        block = 4 * step + (tl.arange(0, lanes) % 4)[:, None]
        return tl.minimum(block, num_groups - 1), block < num_groups

    @triton.jit
    def _mxfp4_mma_load_weights(words_ptr, lo_blocks, hi_blocks, scales_ptr, lo_scales, hi_scales, step, num_groups):
        """A lane's weights of one K step: the words [32 W, 4] of its block of rows g (lo) and g + 8 (hi) and
        their scale bytes (elements 0 and 1; past the row's end, the bias that makes the scale's mul by zero)."""
        j = tl.arange(0, 4)[None, :]
        block, valid = _mxfp4_mma_block(lo_blocks.shape[0], step, num_groups)
        w_lo = tl.load(words_ptr + (lo_blocks + block) * 4 + j, eviction_policy="evict_first")
        w_hi = tl.load(words_ptr + (hi_blocks + block) * 4 + j, eviction_policy="evict_first")
        scale_at = tl.where(j == 0, lo_scales, hi_scales) + block
        scales = tl.load(scales_ptr + scale_at, mask=(j < 2) & valid, other=0).to(tl.int32)
        scales = tl.where(valid, scales, -_MMA_SCALE_BIAS)                  # past the row: m = 0
        return w_lo, w_hi, scales

    @triton.jit
    def _mxfp4_mma_load_activations(x_words, lanes: tl.constexpr, step, num_groups):
        """A lane's 16 activation words of one K step (its block's) as four [32 W, 4] (words 4q .. 4q + 3 in
        tensor q)."""
        j = tl.arange(0, 4)[None, :]
        block, _ = _mxfp4_mma_block(lanes, step, num_groups)
        x_at = x_words + block * 16 + j
        return tl.load(x_at), tl.load(x_at + 4), tl.load(x_at + 8), tl.load(x_at + 12)

    @triton.jit
    def _mxfp4_mma_load(words_ptr, lo_blocks, hi_blocks, scales_ptr, lo_scales, hi_scales, x_words, step,
                        num_groups):
        """One K step's operands of a lane: its weights (`_mxfp4_mma_load_weights`) and activations."""
        w_lo, w_hi, scales = _mxfp4_mma_load_weights(words_ptr, lo_blocks, hi_blocks, scales_ptr, lo_scales,
                                                     hi_scales, step, num_groups)
        xa, xb, xc, xd = _mxfp4_mma_load_activations(x_words, lo_blocks.shape[0], step, num_groups)
        return w_lo, w_hi, scales, xa, xb, xc, xd

    # Programmatic dependent launch (Hopper): gdc_wait blocks until the grid this one depends on has finished and
    # its writes are visible; gdc_launch_dependents lets that dependent grid start before this one ends. Both are
    # no-ops in a launch without the dependency.

    @triton.jit
    def _mxfp4_mma_walk(words_ptr, lo_blocks, hi_blocks, scales_ptr, lo_scales, hi_scales, x_words, step_begin,
                        step_end, num_groups, EMULATE: tl.constexpr, WAIT: tl.constexpr = False):
        """[32 W, 4] fp32 mma sums of K steps [step_begin, step_end) (2^-MMA_SCALE_SHIFT times the dot products):
        element 0 row g, element 2 row g + 8 (1 and 3: the same, the B operand's next column). The next step
        loads while this one computes (the last step reloads itself). Loading two steps ahead measured 1.2-1.5x
        slower on the H200 (2026-11-29: more registers, fewer programs resident); so did asking L2 for the walk
        ahead of it (2026-11-30). WAIT: the activations come from the grid this one depends on, so the first
        step's weights load, then the wait, then its activations."""
        acc = tl.zeros(lo_blocks.shape, dtype=tl.float32) + tl.zeros([1, 4], dtype=tl.float32)
        w_lo, w_hi, scales = _mxfp4_mma_load_weights(words_ptr, lo_blocks, hi_blocks, scales_ptr, lo_scales,
                                                     hi_scales, step_begin, num_groups)
        if WAIT and not EMULATE:
            gdc_wait()
        xa, xb, xc, xd = _mxfp4_mma_load_activations(x_words, lo_blocks.shape[0], step_begin, num_groups)
        for step in range(step_begin, step_end):
            n_lo, n_hi, n_scales, n_xa, n_xb, n_xc, n_xd = _mxfp4_mma_load(
                words_ptr, lo_blocks, hi_blocks, scales_ptr, lo_scales, hi_scales, x_words,
                tl.minimum(step + 1, step_end - 1), num_groups)
            if EMULATE:
                acc = _mxfp4_mma_emulated(w_lo, w_hi, scales, xa, xb, xc, xd, acc)
            else:
                acc = tl.inline_asm_elementwise(_MXFP4_MMA_PTX, _MXFP4_MMA_CONSTRAINTS,
                                                [w_lo, w_hi, scales, xa, xb, xc, xd, acc], dtype=tl.float32,
                                                is_pure=True, pack=4)
            w_lo, w_hi, scales, xa, xb, xc, xd = n_lo, n_hi, n_scales, n_xa, n_xb, n_xc, n_xd
        return acc

    @triton.jit
    def _mxfp4_mma_arrive(count_ptr, TOTAL):
        """Count this program's arrival at its tile's counter; True for the last of TOTAL, which resets it."""
        tl.debug_barrier()                                      # every thread's partial before the arrival
        arrived = tl.atomic_add(count_ptr, 1, sem="acq_rel", scope="gpu")
        last = arrived == TOTAL - 1
        if last:
            tl.atomic_xchg(count_ptr, 0, sem="relaxed", scope="gpu")
        return last

    @triton.jit
    def _mxfp4_mma_gate_up_kernel(x_ptr, words_ptr, scales_ptr, bias_ptr, h_ptr, ids_ptr, part_ptr, count_ptr,
                                  top_k, K, N, stride_xw, stride_be, stride_br, stride_se, stride_sr, stride_bias,
                                  stride_hm, alpha, limit, up_offset,
                                  HAS_BIAS: tl.constexpr, HAS_LIMIT: tl.constexpr, INTERLEAVED: tl.constexpr,
                                  WARPS: tl.constexpr, SPLIT_K: tl.constexpr, EMULATE: tl.constexpr,
                                  PDL: tl.constexpr = False):
        """h[pair, n] = act(x[token] @ W13[e].T + b13[e]) for 8 * WARPS columns n: warp w's tile rows g and g + 8
        are the gate and the up row of column 8 w + g. x is read as int32 words (bf16 pairs; stride_xw counts
        words); weight strides count 16-byte blocks. SPLIT_K programs share the K steps of a tile, each writing
        fp32 partials [SPLIT_K, pairs, 2, N]; the last to arrive at the tile's counter finishes. PDL: once every
        program has started, the down GEMV (a programmatic dependent launch) may start too: its programs take
        the room left on the SMs, load their first weights and wait for this launch to end."""
        if PDL and not EMULATE:
            gdc_launch_dependents()
        pair = tl.program_id(0)
        token = pair // top_k
        i = tl.arange(0, 32 * WARPS)[:, None]
        j = tl.arange(0, 4)[None, :]
        n = tl.program_id(1) * (8 * WARPS) + 8 * (i // 32) + (i % 32) // 4              # [32 W, 1]
        n_mask = n < N
        n_at = tl.minimum(n, N - 1)
        expert = tl.load(ids_ptr + pair).to(tl.int64)     # negative: another rank's expert, h = 0
        valid = expert >= 0
        expert = tl.maximum(expert, 0)
        if INTERLEAVED:
            gate_rows, up_rows = 2 * n_at, 2 * n_at + 1
        else:
            gate_rows, up_rows = n_at, n_at + N
        num_groups = K // 32
        steps = tl.cdiv(num_groups, 4)
        per_split = tl.cdiv(steps, SPLIT_K)
        step_begin = tl.program_id(2) * per_split
        acc = _mxfp4_mma_walk(words_ptr, expert * stride_be + gate_rows.to(tl.int64) * stride_br,
                              expert * stride_be + up_rows.to(tl.int64) * stride_br, scales_ptr,
                              expert * stride_se + gate_rows.to(tl.int64) * stride_sr,
                              expert * stride_se + up_rows.to(tl.int64) * stride_sr,
                              x_ptr + token.to(tl.int64) * stride_xw, step_begin,
                              tl.minimum(step_begin + per_split, steps), num_groups, EMULATE)
        acc = acc * _MMA_UNSHIFT
        gate = tl.sum(tl.where(j == 0, acc, 0.0), axis=1)[:, None]                    # [32 W, 1]
        up = tl.sum(tl.where(j == 2, acc, 0.0), axis=1)[:, None]
        mine = n_mask & (i % 4 == 0)                                # lane c = 0 of each row group stores
        finish = True
        if SPLIT_K > 1:
            num_pairs = tl.num_programs(0)
            at = (tl.program_id(2) * num_pairs + pair).to(tl.int64) * (2 * N) + n
            tl.store(part_ptr + at, gate, mask=mine)
            tl.store(part_ptr + at + N, up, mask=mine)
            finish = _mxfp4_mma_arrive(count_ptr + pair * tl.num_programs(1) + tl.program_id(1), SPLIT_K)
            if finish:
                gate = tl.zeros([32 * WARPS, 1], dtype=tl.float32)
                up = tl.zeros([32 * WARPS, 1], dtype=tl.float32)
                for split in range(0, SPLIT_K):
                    at = (split * num_pairs + pair).to(tl.int64) * (2 * N) + n
                    gate += tl.load(part_ptr + at, mask=mine, other=0.0, cache_modifier=".cg")
                    up += tl.load(part_ptr + at + N, mask=mine, other=0.0, cache_modifier=".cg")
        if finish:
            if HAS_BIAS:
                gate += tl.load(bias_ptr + expert * stride_bias + gate_rows).to(tl.float32)
                up += tl.load(bias_ptr + expert * stride_bias + up_rows).to(tl.float32)
            if HAS_LIMIT:
                gate = tl.minimum(gate, limit)
                up = tl.minimum(tl.maximum(up, -limit), limit)
            h = tl.where(valid, gate * tl.sigmoid(alpha * gate) * (up + up_offset), 0.0)
            tl.store(h_ptr + pair * stride_hm + n, h.to(h_ptr.dtype.element_ty), mask=mine)

    @triton.jit
    def _mxfp4_mma_down_kernel(h_ptr, words_ptr, scales_ptr, bias_ptr, out_ptr, weights_ptr, ids_ptr, part_ptr,
                               count_ptr, top_k, K, N, stride_hw, stride_be, stride_br, stride_se, stride_sr,
                               stride_bias, stride_om, HAS_BIAS: tl.constexpr, WARPS: tl.constexpr,
                               SPLIT_K: tl.constexpr, EMULATE: tl.constexpr, PDL: tl.constexpr = False):
        """out[token, n] = sum_k weight[pair] * (h[pair] @ W2[e].T + b2[e])[n] for 16 * WARPS rows n. Program
        (token, row tile, s) reads slot s // SPLIT_K's expert over its K part s % SPLIT_K and writes the weighted
        fp32 partial [top_k * SPLIT_K, tokens, N]; the last of the tile's top_k * SPLIT_K programs to arrive sums
        them in order, adds the weighted biases and stores the row. PDL: launched as a programmatic dependent of
        the gate/up GEMV, it reads the routing and its first weights before waiting for that launch to end, and
        h, the partials and the counters only after."""
        token = tl.program_id(0)
        split = tl.program_id(2)
        slot = split // SPLIT_K
        pair = token * top_k + slot
        i = tl.arange(0, 32 * WARPS)[:, None]
        j = tl.arange(0, 4)[None, :]
        n = tl.program_id(1) * (16 * WARPS) + 16 * (i // 32) + (i % 32) // 4             # row g; + 8: row g + 8
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        weight = tl.where(expert >= 0, tl.load(weights_ptr + pair).to(tl.float32), 0.0)
        expert = tl.maximum(expert, 0)
        num_groups = K // 32
        steps = tl.cdiv(num_groups, 4)
        per_split = tl.cdiv(steps, SPLIT_K)
        step_begin = (split % SPLIT_K) * per_split
        lo_rows = tl.minimum(n, N - 1).to(tl.int64)                  # rows past N read row N - 1, never stored
        hi_rows = tl.minimum(n + 8, N - 1).to(tl.int64)
        acc = _mxfp4_mma_walk(words_ptr, expert * stride_be + lo_rows * stride_br,
                              expert * stride_be + hi_rows * stride_br, scales_ptr,
                              expert * stride_se + lo_rows * stride_sr, expert * stride_se + hi_rows * stride_sr,
                              h_ptr + pair.to(tl.int64) * stride_hw, step_begin,
                              tl.minimum(step_begin + per_split, steps), num_groups, EMULATE, PDL)
        out = acc * (weight * _MMA_UNSHIFT)
        rows = n + 8 * (j // 2)                                                         # [32 W, 4]
        mine = (rows < N) & (i % 4 == 0) & (j % 2 == 0)
        total = top_k * SPLIT_K
        finish = total == 1
        if total > 1:
            at = (split * tl.num_programs(0) + token).to(tl.int64) * N + rows
            tl.store(part_ptr + at, out, mask=mine)
            finish = _mxfp4_mma_arrive(count_ptr + token * tl.num_programs(1) + tl.program_id(1), total)
            if finish:
                out = tl.zeros([32 * WARPS, 4], dtype=tl.float32)
                for other in range(0, total):
                    at = (other * tl.num_programs(0) + token).to(tl.int64) * N + rows
                    out += tl.load(part_ptr + at, mask=mine, other=0.0, cache_modifier=".cg")
        if finish:
            if HAS_BIAS:
                out = _add_slot_biases(out, bias_ptr, ids_ptr, weights_ptr, token, top_k, stride_bias, rows, mine)
            tl.store(out_ptr + token * stride_om + rows, out.to(out_ptr.dtype.element_ty), mask=mine)


@dataclass(frozen=True, slots=True)
class GemvTiles:
    block_n_gate_up: int = 16          # intermediate columns per program: 2x as many gate/up weight rows
    block_n_down: int = 8              # output columns (weight rows) per program
    block_g: int = 8                   # 16-byte blocks (32 elements) of each row per K step, gate/up
    num_warps: int = 4
    prefetch: bool = True              # load step i + 1 before decoding step i
    ptx_decode: bool = True            # the PTX pair decode (GPU only; the interpreter runs the Triton one)
    block_g_down: int = 32             # K step of the down GEMV: its grid is small, so each program reads deep
    num_warps_down: int = 4
    gluon: bool = False                # gate/up by the explicit-layout kernel (block_g: lanes along K, <= 32)
    gluon_down: bool = False           # the down GEMV by it (block_g_down likewise)
    split_down: int = 1                # with gluon_down: the token's slots divided among this many programs
    mma: bool = False                  # gate/up on the tensor cores (bf16 activations): 8 * mma_warps columns a program
    mma_warps: int = 4
    mma_split: int = 1                 # K splits of the tensor-core gate/up GEMV
    mma_down: bool = False             # the down GEMV on the tensor cores: 16 * mma_warps_down rows a program
    mma_warps_down: int = 4
    mma_split_down: int = 1            # K splits of each slot in the tensor-core down GEMV
    mma_pdl: bool = False              # both tensor-core GEMVs: the down one a programmatic dependent launch (Hopper)

    @staticmethod
    def for_shape(hidden: int, inter: int) -> "GemvTiles":
        """The table below, keyed by expert shape (hidden, intermediate); the nearest row by weight bytes
        for other shapes. Chosen once per call from the shapes: nothing is tuned inside a graph."""
        key = min(GEMV_TILE_TABLE, key=lambda shape: abs(shape[0] * shape[1] - hidden * inter))
        return GEMV_TILE_TABLE[key]


# From the tools/decode_kernels.py sweep on an H200 (2026-11-29; figures in docs/PERFORMANCE.md). The explicit-layout
# fields are the fallback of the tensor-core kernels (activations other than bf16).
GEMV_TILE_TABLE: dict[tuple[int, int], GemvTiles] = {
    (2880, 2880): GemvTiles(16, 16, 32, 4, block_g_down=32, num_warps_down=4, gluon=True, gluon_down=True, split_down=2, mma=True, mma_warps=4, mma_split=2, mma_down=True, mma_warps_down=4, mma_split_down=4),
    (4096, 2048): GemvTiles(16, 16, 32, 4, block_g_down=32, num_warps_down=4, gluon=True, gluon_down=True, split_down=1, mma=True, mma_warps=4, mma_split=2, mma_down=True, mma_warps_down=4, mma_split_down=2),
}


def _use_gluon(flag: bool, x: torch.Tensor) -> bool:
    return flag and x.is_cuda and gluon is not None


def scales_fit_mma(w: Mxfp4Linear) -> bool:
    """Whether every E8M0 scale of `w` lies in [MMA_SCALE_SHIFT, 128 + MMA_SCALE_SHIFT], where the tensor-core
    GEMVs' bf16 weights are exact (released checkpoints sit near 115-130); weights outside take the other GEMVs.
    Checked once per scales tensor (the answer is kept on it: packages wrap their parameters in a new
    Mxfp4Linear each call), at its first call: one host sync, in the eager warm-up before any graph capture."""
    fits = getattr(w.scales, "_fits_mma", None)
    if fits is None:
        fits = bool(((w.scales >= MMA_SCALE_SHIFT) & (w.scales <= 128 + MMA_SCALE_SHIFT)).all())
        w.scales._fits_mma = fits
    return fits


def _use_mma(flag: bool, x: torch.Tensor, w: Mxfp4Linear) -> bool:
    """The tensor-core GEMVs take bf16 activations (on the GPU, or emulated in the interpreter) and weights whose
    scales they represent exactly."""
    return flag and x.dtype == torch.bfloat16 and x.shape[1] % 8 == 0 and scales_fit_mma(w)


def _mma_words(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """bf16 rows as int32 words, each row 16-byte aligned (the mma GEMVs load 4 words at a time), and the row
    stride in words."""
    if x.stride(-1) != 1 or x.data_ptr() % 16 or (x.stride(0) * 2) % 16:
        x = torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)
    words = x.view(torch.int32)
    return words, words.stride(0)


_MMA_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def _mma_counters(device: torch.device, count: int) -> torch.Tensor:
    """int32 arrival counters of the split tensor-core GEMVs, kept per device: zero when made, and every launch
    leaves them at zero (the last program of a tile resets its counter), so no launch clears them. Made by an
    eager call (the runner's warm-up), never inside a graph capture; a larger set made later never frees the
    earlier one (a captured graph may still use it)."""
    kept = _MMA_COUNTERS.setdefault(device, [])
    if not kept or kept[-1].numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("the MXFP4 mma GEMV's counters must be made by an eager call before graph capture")
        kept.append(torch.zeros(max(count, 1 << 16), dtype=torch.int32, device=device))
    return kept[-1]


def _activations_for_gemv(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """x with unit stride along K and rows 8-byte aligned (the explicit-layout kernels load 64 bits at a time),
    and its X_PACKED code: 1 bf16, 2 fp16, 0 fp32."""
    if x.stride(-1) != 1 or x.data_ptr() % 8 or (x.stride(0) * x.element_size()) % 8:
        x = torch.empty_like(x, memory_format=torch.contiguous_format).copy_(x)
    return x, {torch.bfloat16: 1, torch.float16: 2, torch.float32: 0}[x.dtype]


def _check_gemv_weights(w: Mxfp4Linear) -> None:
    if w.blocks.stride(-1) != 1 or w.blocks.stride(-2) != 16 or w.scales.stride(-1) != 1 \
            or w.blocks.stride(0) % 16 or w.blocks.stride(1) % 16 or w.blocks.storage_offset() % 16:
        raise ValueError("MXFP4 GEMV needs each weight row's blocks and scales contiguous, 16-byte aligned")


def _down_counts(num_tokens: int, hidden: int, tiles: GemvTiles) -> int:
    """How many arrival counters the split down GEMV needs (0 without a split)."""
    return num_tokens * triton.cdiv(hidden, tiles.block_n_down) if tiles.gluon_down and tiles.split_down > 1 else 0


def mxfp4_gemv_gate_up(x: torch.Tensor, w13: Mxfp4Linear, topk_ids: torch.Tensor, activation: GatedActivation,
                       tiles: GemvTiles, counters: torch.Tensor | None = None) -> torch.Tensor:
    """h [pairs, inter] = act(x[token] @ W13[e].T + b13[e]) for every (token, slot) pair, in x's dtype.
    `counters` (int32), when given, are zeroed by the launch for the split down GEMV that follows (not by the
    tensor-core launch, tiles.mma with bf16 x)."""
    _check_gemv_weights(w13)
    num_tokens, top_k = topk_ids.shape
    inter = w13.out_features // 2
    x = x.contiguous()
    h = torch.empty(num_tokens * top_k, inter, dtype=x.dtype, device=x.device)           # [pairs, inter]
    bias = w13.bias if w13.bias is not None else torch.empty(1, dtype=torch.float32, device=x.device)
    bias_stride = bias.stride(0) if w13.bias is not None else 0
    if _use_mma(tiles.mma, x, w13):
        words, stride_xw = _mma_words(x)
        block_n, split = 8 * tiles.mma_warps, tiles.mma_split
        grid = (num_tokens * top_k, triton.cdiv(inter, block_n), split)
        part = torch.empty(split, grid[0], 2, inter, dtype=torch.float32, device=x.device) if split > 1 else h
        count = _mma_counters(x.device, grid[0] * grid[1]) if split > 1 else h
        _mxfp4_mma_gate_up_kernel[grid](
            words, w13.blocks.view(torch.int32), w13.scales, bias, h, topk_ids.contiguous().view(-1), part, count,
            top_k, x.shape[1], inter, stride_xw, w13.blocks.stride(0) // 16, w13.blocks.stride(1) // 16,
            w13.scales.stride(0), w13.scales.stride(1), bias_stride, h.stride(0),
            activation.alpha, activation.limit or 0.0, activation.up_offset,
            HAS_BIAS=w13.bias is not None, HAS_LIMIT=activation.limit is not None, INTERLEAVED=activation.interleaved,
            WARPS=tiles.mma_warps, SPLIT_K=split, EMULATE=not x.is_cuda, PDL=tiles.mma_pdl,
            num_warps=tiles.mma_warps)
        return h
    num_counts = 0 if counters is None else counters.numel()
    counters = h if counters is None else counters
    grid = (num_tokens * top_k, triton.cdiv(inter, tiles.block_n_gate_up))
    if _use_gluon(tiles.gluon, x):
        x, x_packed = _activations_for_gemv(x)
        kernel, options = _gl_gate_up_kernel, dict(GV=tiles.block_g, X_PACKED=x_packed, NUM_WARPS=tiles.num_warps)
    else:
        kernel, options = _mxfp4_gemv_gate_up_kernel, dict(BLOCK_G=tiles.block_g, PREFETCH=tiles.prefetch,
                                                           PTX_DECODE=tiles.ptx_decode and x.is_cuda)
    # int32 words over the same bytes (4 per 16-byte block); weight strides passed in 16-byte blocks
    kernel[grid](
        x, w13.blocks.view(torch.int32), w13.scales, bias, h, topk_ids.contiguous().view(-1), counters, num_counts,
        top_k, x.shape[1], inter, x.stride(0), w13.blocks.stride(0) // 16, w13.blocks.stride(1) // 16,
        w13.scales.stride(0), w13.scales.stride(1), bias.stride(0) if w13.bias is not None else 0, h.stride(0),
        activation.alpha, activation.limit or 0.0, activation.up_offset,
        HAS_BIAS=w13.bias is not None, HAS_LIMIT=activation.limit is not None, INTERLEAVED=activation.interleaved,
        BLOCK_N=tiles.block_n_gate_up, num_warps=tiles.num_warps, **options)
    return h


def mxfp4_gemv_down(h: torch.Tensor, w2: Mxfp4Linear, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    tiles: GemvTiles, counters: torch.Tensor | None = None) -> torch.Tensor:
    """out [tokens, hidden] = sum_k weight_k * (h[pair] @ W2[e].T + b2[e]), in h's dtype. A split launch
    counts its programs' arrivals in `counters` (int32 zeros, `_down_counts` of them; made here if not given)."""
    _check_gemv_weights(w2)
    num_tokens, top_k = topk_ids.shape
    hidden = w2.out_features
    out = torch.empty(num_tokens, hidden, dtype=h.dtype, device=h.device)
    bias = w2.bias if w2.bias is not None else torch.empty(1, dtype=torch.float32, device=h.device)
    weights, ids = topk_weights.contiguous().view(-1), topk_ids.contiguous().view(-1)
    strides = (h.stride(0), w2.blocks.stride(0) // 16, w2.blocks.stride(1) // 16, w2.scales.stride(0),
               w2.scales.stride(1), bias.stride(0) if w2.bias is not None else 0, out.stride(0))
    if _use_mma(tiles.mma_down, h, w2):
        words, stride_hw = _mma_words(h)
        split = tiles.mma_split_down
        grid = (num_tokens, triton.cdiv(hidden, 16 * tiles.mma_warps_down), top_k * split)
        part = torch.empty(grid[2], num_tokens, hidden, dtype=torch.float32, device=h.device) if grid[2] > 1 else out
        count = _mma_counters(h.device, grid[0] * grid[1]) if grid[2] > 1 else out
        _mxfp4_mma_down_kernel[grid](
            words, w2.blocks.view(torch.int32), w2.scales, bias, out, weights, ids, part, count, top_k, h.shape[1],
            hidden, stride_hw, *strides[1:], HAS_BIAS=w2.bias is not None, WARPS=tiles.mma_warps_down,
            SPLIT_K=split, EMULATE=not h.is_cuda, PDL=tiles.mma_pdl, num_warps=tiles.mma_warps_down,
            **({"launch_pdl": True} if tiles.mma_pdl and h.is_cuda else {}))
        return out
    if _use_gluon(tiles.gluon_down, h):
        h, h_packed = _activations_for_gemv(h)
        strides = (h.stride(0),) + strides[1:]
        split = max(1, min(tiles.split_down, top_k))
        part = out
        if split > 1:
            part = torch.empty(split, num_tokens, hidden, dtype=torch.float32, device=h.device)
            if counters is None:
                counters = torch.zeros(_down_counts(num_tokens, hidden, tiles), dtype=torch.int32, device=h.device)
        else:
            counters = out
        _gl_down_kernel[(num_tokens, triton.cdiv(hidden, tiles.block_n_down), split)](
            h, w2.blocks.view(torch.int32), w2.scales, bias, out, weights, ids, part, counters, top_k, h.shape[1],
            hidden, *strides, HAS_BIAS=w2.bias is not None, BLOCK_N=tiles.block_n_down, GV=tiles.block_g_down,
            X_PACKED=h_packed, SPLIT=split, NUM_WARPS=tiles.num_warps_down, num_warps=tiles.num_warps_down)
        return out
    _mxfp4_gemv_down_kernel[(num_tokens, triton.cdiv(hidden, tiles.block_n_down))](
        h, w2.blocks.view(torch.int32), w2.scales, bias, out, weights, ids, top_k, h.shape[1], hidden, *strides,
        HAS_BIAS=w2.bias is not None, BLOCK_N=tiles.block_n_down, BLOCK_G=tiles.block_g_down,
        PREFETCH=tiles.prefetch, PTX_DECODE=tiles.ptx_decode and h.is_cuda, num_warps=tiles.num_warps_down)
    return out


def mxfp4_moe_gemv(x: torch.Tensor, w13: Mxfp4Linear, w2: Mxfp4Linear, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, activation: GatedActivation, tiles: GemvTiles | None = None) -> torch.Tensor:
    """The same function as `mxfp4_moe_reference`, as two GEMV launches (for a few tokens: each pair reads
    its expert's bytes once)."""
    if triton is None:
        raise RuntimeError("mxfp4_moe_gemv needs the triton package")
    hidden, inter = x.shape[1], w2.in_features
    if w13.in_features != hidden or w13.out_features != 2 * inter or w2.out_features != hidden:
        raise ValueError(f"expert shapes do not chain: x [.., {hidden}], w13 [{w13.out_features}, "
                         f"{w13.in_features}], w2 [{w2.out_features}, {w2.in_features}]")
    if topk_ids.numel() == 0:
        return torch.zeros(topk_ids.shape[0], hidden, dtype=x.dtype, device=x.device)
    tiles = tiles or GemvTiles.for_shape(hidden, inter)
    num_counts = _down_counts(topk_ids.shape[0], hidden, tiles) \
        if x.is_cuda and not _use_mma(tiles.mma_down, x, w2) else 0
    # the split down GEMV's counters: zeroed by the gate/up launch, so no memset of their own (the tensor-core
    # gate/up does not: then the kept counters, which the down GEMV leaves at zero)
    counters = None
    if num_counts:
        counters = _mma_counters(x.device, num_counts)[:num_counts] if _use_mma(tiles.mma, x, w13) else \
            torch.empty(num_counts, dtype=torch.int32, device=x.device)
    h = mxfp4_gemv_gate_up(x, w13, topk_ids, activation, tiles, counters)
    return mxfp4_gemv_down(h, w2, topk_weights, topk_ids, tiles, counters)
