"""Reading and writing DeepSeek V4's paged caches by token position: the torch references (the CPU path).

Every cache of a layer is a runtime cache group: the 128-token K=V window, the compressed entries (one per
`ratio` positions), the indexer keys, and each compressor's per-token state (a small window group). A layer
reads any of them through its request's block table; entry e of a ratio-r group covers positions
[e * r, e * r + r).

With `--kv-cache-dtype fp8` the K=V entries (window and compressed) and the indexer keys are stored as bytes
(`Fp8Entry`): the leading dims in e4m3 with a power-of-two (UE8M0) scale per block of them, the trailing RoPE
dims in bf16, then the scale bytes. A write quantizes, a read dequantizes exactly (e4m3 times a power of two
is a bf16 number)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from runtime.forward import ForwardContext

E4M3_MAX = 448.0
AMAX_FLOOR = 2.0 ** -64                  # an all-zero block still gets a finite scale


@dataclass(frozen=True, slots=True)
class Fp8Entry:
    """One entry of `dim` values as bytes: [dim - bf16_tail e4m3 | bf16_tail bf16 | one UE8M0 scale per
    `block` e4m3 dims | pad to 4 bytes]. The release's K=V entry (512 dims, 64 RoPE dims in bf16, blocks of
    64) is 448 + 128 + 7 + 1 = 584 bytes; its indexer key (128 dims, one scale) 128 + 1 + 3 = 132."""
    dim: int
    bf16_tail: int
    block: int

    @property
    def nope(self) -> int:
        return self.dim - self.bf16_tail

    @property
    def num_scales(self) -> int:
        return -(-self.nope // self.block)

    @property
    def scales_at(self) -> int:
        return self.nope + 2 * self.bf16_tail

    @property
    def num_bytes(self) -> int:
        return -(-(self.scales_at + self.num_scales) // 4) * 4


def scale_exponents(amax: torch.Tensor) -> torch.Tensor:
    """The smallest k with amax / 2^k <= 448 (int32): amax = m * 2^e with m in [0.5, 1), 448 = 0.875 * 2^9.
    Exact (no log2 rounding), as the kernels compute it from the float's bits."""
    mantissa, exponent = torch.frexp(amax.float().clamp(min=AMAX_FLOOR))
    return exponent - 9 + (mantissa > E4M3_MAX / 512).int()


def quantize_entries(x: torch.Tensor, fmt: Fp8Entry) -> torch.Tensor:
    """x [n, dim] -> [n, fmt.num_bytes] float8_e4m3fn holding the byte layout of `Fp8Entry`."""
    n = x.shape[0]
    out = torch.zeros(n, fmt.num_bytes, dtype=torch.uint8, device=x.device)
    padded = fmt.num_scales * fmt.block
    blocks = torch.nn.functional.pad(x[:, :fmt.nope].float(), (0, padded - fmt.nope)).view(n, fmt.num_scales, -1)
    k = scale_exponents(blocks.abs().amax(dim=-1))                            # [n, num_scales]
    scaled = torch.ldexp(blocks, -k[..., None].float()).flatten(1)[:, :fmt.nope]
    out[:, :fmt.nope] = scaled.to(torch.float8_e4m3fn).view(torch.uint8)
    out[:, fmt.nope:fmt.scales_at] = x[:, fmt.nope:].to(torch.bfloat16).contiguous().view(torch.uint8)
    out[:, fmt.scales_at:fmt.scales_at + fmt.num_scales] = (k + 127).to(torch.uint8)
    return out.view(torch.float8_e4m3fn)


def dequantize_entries(raw: torch.Tensor, fmt: Fp8Entry, dtype: torch.dtype) -> torch.Tensor:
    """[..., fmt.num_bytes] -> [..., fmt.dim] in `dtype` (exact in bf16 and fp32)."""
    raw = raw.view(torch.uint8)
    k = raw[..., fmt.scales_at:fmt.scales_at + fmt.num_scales].int() - 127    # [..., num_scales]
    exponents = k.repeat_interleave(fmt.block, dim=-1)[..., :fmt.nope]
    nope = torch.ldexp(raw[..., :fmt.nope].view(torch.float8_e4m3fn).float(), exponents.float())
    tail = raw[..., fmt.nope:fmt.scales_at].contiguous().view(torch.bfloat16).float()
    return torch.cat([nope, tail], dim=-1).to(dtype)


def token_requests(ctx: ForwardContext, num_tokens: int) -> torch.Tensor:
    """[num_tokens] int64 on the step's device: the batch row of each token, from the device's query starts
    (no host read, so a CUDA graph can capture it)."""
    starts = ctx.query_start_loc[1:ctx.num_reqs + 1]
    tokens = torch.arange(num_tokens, dtype=starts.dtype, device=starts.device)
    return torch.searchsorted(starts, tokens, right=True).clamp_(max=max(ctx.num_reqs - 1, 0))


def write_entries(cache: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, fmt: Fp8Entry | None = None) -> None:
    """Store values [n, *entry] at flat entry slots [n]; slot -1 writes nothing. With `fmt`, values [n, dim]
    are quantized into its byte layout."""
    flat = cache.view(-1, *cache.shape[2:])
    keep = slots >= 0
    values = values[keep]
    flat[slots[keep]] = quantize_entries(values, fmt) if fmt is not None else values.to(cache.dtype)


def gather_entries(cache: torch.Tensor, block_table: torch.Tensor, requests: torch.Tensor,
                   entries: torch.Tensor, block_size: int, ratio: int = 1) -> torch.Tensor:
    """cache [blocks, block_size / ratio, *entry]; requests and entries of the same shape [...] (entry
    indices >= 0) -> [..., *entry]."""
    per_block = block_size // ratio
    blocks = block_table[requests, entries // per_block].long()
    flat = cache.view(-1, *cache.shape[2:])
    return flat[blocks * per_block + entries % per_block]


def request_entries(cache: torch.Tensor, block_table: torch.Tensor, request: int, first: int, end: int,
                    block_size: int, ratio: int = 1) -> torch.Tensor:
    """The entries [first, end) of one request, in order: [end - first, *entry]."""
    per_block = block_size // ratio
    if end <= first:
        return cache.new_zeros((0, *cache.shape[2:]))
    b0, b1 = first // per_block, -(-end // per_block)
    rows = cache[block_table[request, b0:b1].long()].flatten(0, 1)
    return rows[first - b0 * per_block:end - b0 * per_block]


def fill_random(cache: torch.Tensor, fmt: Fp8Entry | None = None, generator: torch.Generator | None = None,
                rows_at_once: int = 1 << 18) -> None:
    """Overwrite every entry of a cache [blocks, entries_per_block, *entry] with standard normal values (the
    scale of an RMS-normed entry), quantized into `fmt`'s layout as a write would store them. For benchmarks
    that skip the prefill: a zero cache makes every indexer score equal and every key a zero."""
    flat = cache.view(-1, fmt.num_bytes if fmt is not None else cache[0, 0].numel())
    dim = fmt.dim if fmt is not None else flat.shape[1]
    for a in range(0, flat.shape[0], rows_at_once):
        b = min(flat.shape[0], a + rows_at_once)
        values = torch.randn(b - a, dim, device=cache.device, generator=generator)
        flat[a:b] = quantize_entries(values, fmt) if fmt is not None else values.to(cache.dtype)


def fill_random_caches(model, caches: list[torch.Tensor], generator: torch.Generator | None = None) -> None:
    """fill_random on each cache of the model's layers (K=V window, compressed entries, indexer keys,
    compressor state), each in its own format; `caches` indexed as the model's cache_specs()."""
    for layer in model.layers:
        attn = layer.attn
        fill_random(caches[attn.window_layer], attn.window_format, generator)
        indexer = [attn.indexer.compressor] if attn.indexer is not None else []
        for compressor in [c for c in [attn.compressor] + indexer if c is not None]:
            fill_random(caches[compressor.state_layer], None, generator)
            fill_random(caches[compressor.entry_layer], compressor.entry_format, generator)
