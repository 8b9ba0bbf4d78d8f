"""Checkpoint names and formats. Two layouts load:

- the release: DeepSeek's names (`embed`, `layers.N.attn.wq_a`, `ffn.experts.E.w1`, `hc_attn_fn`, ...), FP8
  E4M3 linears with a block-scale grid `.scale` ([out, in] blocks, UE8M0), MXFP4 routed experts (int8 packed
  E2M1 pairs with a UE8M0 scale per 32 inputs) or FP8 experts (Base), the rest BF16/FP32, sharded with an
  index; `mtp.*` holds the multi-token-prediction layer;
- what transformers' `save_pretrained` writes (a mix of its own and DeepSeek's names, stacked experts
  `gate_up_proj` / `down_proj`), and transformers' module names in general.

Every name is first rewritten to DeepSeek's, which is what the modules are named after."""
from __future__ import annotations

import re
from typing import Callable, Iterable

import torch
from torch import nn

from runtime.loader import check_loaded, copy_weight, unexpected_weight
from runtime.ops.fp8 import Fp8Linear, fp8_block_dequantize, fp8_block_shape
from runtime.ops.mxfp4 import MX_BLOCK, mxfp4_dequantize
from runtime.parallel import SINGLE, load_shard, materialize

from .linear import Fp8Projection, Fp8Rows, fp8_weight_block

# transformers name -> DeepSeek name, applied in order
_TO_NATIVE = [(re.compile(a), b) for a, b in [
    (r"^model\.", ""),
    (r"^embed_tokens\.", "embed."),
    (r"^lm_head\.", "head."),
    (r"^hc_head\.hc_(fn|base|scale)$", r"hc_head_\1"),
    (r"\.self_attn\.", ".attn."),
    (r"\.mlp\.", ".ffn."),
    (r"\.input_layernorm\.", ".attn_norm."),
    (r"\.post_attention_layernorm\.", ".ffn_norm."),
    (r"\.attn_hc\.(fn|base|scale)$", r".hc_attn_\1"),
    (r"\.ffn_hc\.(fn|base|scale)$", r".hc_ffn_\1"),
    (r"\.attn\.sinks$", ".attn.attn_sink"),
    (r"\.compressor\.indexer\.q_b_proj\.", ".indexer.wq_b."),
    (r"\.compressor\.indexer\.scorer\.weights_proj\.", ".indexer.weights_proj."),
    (r"\.compressor\.indexer\.", ".indexer.compressor."),
    (r"\.q_a_proj\.", ".wq_a."),
    (r"\.q_a_norm\.", ".q_norm."),
    (r"\.q_b_proj\.", ".wq_b."),
    (r"\.shared_experts\.gate_proj\.", ".shared_experts.w1."),
    (r"\.shared_experts\.up_proj\.", ".shared_experts.w3."),
    (r"\.shared_experts\.down_proj\.", ".shared_experts.w2."),
    (r"\.kv_proj\.", ".wkv."),
    (r"\.gate_proj\.", ".wgate."),
    (r"\.o_a_proj\.", ".wo_a."),
    (r"\.o_b_proj\.", ".wo_b."),
    (r"\.position_bias$", ".ape"),
    (r"compressor\.kv_norm\.", "compressor.norm."),
    (r"\.attn\.norm\.", ".attn.kv_norm."),            # save_pretrained writes the attention's kv_norm so
    (r"\.gate\.e_score_correction_bias$", ".gate.bias"),
    (r"\.weight_scale_inv$", ".scale"),
]]
_HC = re.compile(r"(^|\.)hc_(attn|ffn|head)_(fn|base|scale)$")
_EXPERT = re.compile(r"^(layers\.\d+\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")
_STACKED = re.compile(r"^(layers\.\d+\.ffn\.experts)\.(gate_up_proj|down_proj)$")
_MXFP4_DTYPES = (torch.int8, torch.uint8)
# a block of an attention's Projection (attention.wx): the compressors' and the indexer's bf16 projections
_PROJECTION_PART = re.compile(r"^(layers\.\d+\.attn)\.((?:indexer\.)?compressor\.w(?:kv|gate)|indexer\.weights_proj)"
                              r"\.weight$")


def native_name(name: str) -> str:
    for pattern, replacement in _TO_NATIVE:
        name = pattern.sub(replacement, name)
    return name


def _module_name(native: str) -> str:
    return _HC.sub(r"\1hc_\2.\3", native)


def main_model_name(native: str) -> str | None:
    """The main model's parameter for a DeepSeek name; None for the MTP layer's tensors (its drafter's)."""
    return None if native.startswith("mtp.") else native


class _Loader:
    def __init__(self, model: nn.Module, rename: Callable[[str], str | None]):
        self.model = model
        self.rename = rename
        self.params = dict(model.named_parameters())
        self.loaded: set[str] = set()
        self.pending: dict[str, dict[str, torch.Tensor]] = {}     # weight name -> {"weight", "scale"} so far
        self.fp8_block = fp8_weight_block(model.config)
        self.parallel = getattr(model, "parallel", SINGLE)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        native = self.rename(native_name(name))
        if native is None:
            return                     # another module's tensor (the main model and its MTP drafter share files)
        if self._other_ranks_expert(native):
            return                     # expert parallel: never read
        tensor = materialize(tensor)
        if native.endswith(".scale") and not _HC.search(native):
            self._pair(native[:-len(".scale")] + ".weight", "scale", name, tensor)
        elif tensor.dtype == torch.float8_e4m3fn or (tensor.dtype in _MXFP4_DTYPES and _EXPERT.match(native)):
            self._pair(native, "weight", name, tensor)
        else:
            self._assign(native, name, tensor)

    def _pair(self, weight_name: str, part: str, disk_name: str, tensor: torch.Tensor) -> None:
        entry = self.pending.setdefault(weight_name, {})
        entry[part], entry[f"{part}_name"] = tensor, disk_name
        if "weight" in entry and "scale" in entry:
            del self.pending[weight_name]
            self._dequantize(weight_name, entry)

    def _dequantize(self, native: str, entry: dict) -> None:
        weight, scale, name = entry["weight"], entry["scale"], entry["weight_name"]
        if weight.dtype == torch.float8_e4m3fn:
            block = fp8_block_shape(tuple(weight.shape), tuple(scale.shape), name)
            if self.fp8_block is not None and block != self.fp8_block:
                raise ValueError(f"checkpoint tensor {name!r}: its scale {tuple(scale.shape)} implies [out, in] "
                                 f"blocks of {list(block)}, the config's weight_block_size is {list(self.fp8_block)}")
            if isinstance(self._fp8_target(native), (Fp8Linear, Fp8Rows)):      # kept FP8: both, as they are
                self._assign(native, name, weight)
                self._assign(native[:-len("weight")] + "scale", entry["scale_name"], scale.float())
            else:
                self._assign(native, name, fp8_block_dequantize(weight, scale, torch.float32, name))
            return
        out, packed_in = weight.shape
        blocks = weight.view(torch.uint8).reshape(out, -1, MX_BLOCK // 2) if packed_in % (MX_BLOCK // 2) == 0 else None
        scales = scale.view(torch.uint8)
        if blocks is None or tuple(scales.shape) != tuple(blocks.shape[:2]):
            raise ValueError(f"checkpoint tensor {name!r}: MXFP4 weight {tuple(weight.shape)} (two values a byte) "
                             f"needs a scale of shape ({out}, {packed_in * 2 // MX_BLOCK}), got {tuple(scale.shape)}")
        match = _EXPERT.match(native)
        experts = self.model.get_submodule(match.group(1))
        if experts.packed:
            self._expert(match, name, blocks, scales)
        else:
            self._assign(native, name, mxfp4_dequantize(blocks, scales))

    def _fp8_target(self, native: str) -> nn.Module | Fp8Rows | None:
        """The module (or a stacked projection's Fp8Rows) a `.weight` name belongs to (None for experts and for
        names of no module)."""
        if _EXPERT.match(native):
            return None
        return self._attribute(native.rsplit(".", 1)[0])

    def _attribute(self, path: str):
        """The model's attribute at a dotted path, None where there is none."""
        owner, _, attribute = path.rpartition(".")
        try:
            return getattr(self.model.get_submodule(owner), attribute, None)
        except AttributeError:
            return None

    def _fp8_rows(self, native: str) -> Fp8Rows | None:
        """The part of a stacked FP8 projection a `.weight` / `.scale` name fills, None for other names."""
        owner, _, leaf = native.rpartition(".")
        target = self._attribute(owner) if leaf in ("weight", "scale") else None
        return target if isinstance(target, Fp8Rows) else None

    def _assign(self, native: str, disk_name: str, tensor: torch.Tensor) -> None:
        if match := _EXPERT.match(native):
            self._expert(match, disk_name, tensor)
        elif match := _STACKED.match(native):
            self._stacked(match, disk_name, tensor)
        elif (match := _PROJECTION_PART.match(native)) and f"{match.group(1)}.wx.weight" in self.params:
            projection = self.model.get_submodule(match.group(1)).wx
            copy_weight(projection.weight[projection.parts[match.group(2)]], disk_name, tensor)
            self.loaded.add(native)
        else:
            rows = self._fp8_rows(native)
            target = native if rows is not None else _module_name(native)
            if rows is None and target not in self.params:
                raise unexpected_weight(disk_name)
            # a stacked projection's part: its rows of the one weight (or scale grid)
            param = getattr(rows, native.rsplit(".", 1)[1]) if rows is not None else self.params[target]
            if param.dtype == torch.float8_e4m3fn and tensor.dtype != torch.float8_e4m3fn:
                raise ValueError(f"checkpoint tensor {disk_name!r} is {tensor.dtype}, but the config's "
                                 f"quantization_config makes it an FP8 linear (weight_block_size)")
            copy_weight(param, disk_name, self._shard(target, tensor, param))
            self.loaded.add(target)

    # ---- tensor parallelism: which part of a tensor this rank keeps ----------------------------------------

    _SHARDED = re.compile(r"^(embed|head)\.weight$|\.attn\.(wq_b|wo_a|wo_b|attn_sink)|\.shared_experts\.(w[123])\.")

    def _shard(self, target: str, tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """This rank's rows (or columns) of a tensor whose parameter is split: the vocabulary, the query heads
        and their sinks, the output groups, the shared expert's intermediate rows. A kept FP8 weight's scale
        grid splits the same way, in blocks (the FP8 module exists only where a rank's share is whole blocks)."""
        if self.parallel.world_size == 1 or not (match := self._SHARDED.search(target)):
            return tensor
        dim = 1 if match.group(2) == "wo_b" or match.group(3) == "w2" else 0
        if match.group(1):
            return self.model.get_submodule(match.group(1)).load(tensor)
        return load_shard(tensor, dim, self.parallel.rank * param.shape[dim], param.shape[dim])

    def _other_ranks_expert(self, native: str) -> bool:
        match = _EXPERT.match(native.removesuffix(".scale") + ".weight" if native.endswith(".scale") else native)
        if match is None or not self.parallel.enable_expert_parallel:
            return False
        experts = self.model.get_submodule(match.group(1))
        return not 0 <= int(match.group(2)) - experts.first_expert < experts.num_local_experts

    def _expert_part(self, experts: nn.Module, which: str, tensor: torch.Tensor, packed_k: bool) -> torch.Tensor:
        """Without expert parallelism, this rank's intermediate rows (w1, w3) or columns (w2; in 32-element
        blocks for MXFP4, `packed_k`) of one expert's tensor."""
        if self.parallel.world_size == 1 or self.parallel.enable_expert_parallel:
            return tensor
        inter = experts.num_local_inter
        if which != "w2":
            return load_shard(tensor, 0, self.parallel.rank * inter, inter)
        part = inter // MX_BLOCK if packed_k else inter
        return load_shard(tensor, 1, self.parallel.rank * part, part)

    def _expert(self, match: re.Match, disk_name: str, tensor: torch.Tensor, scales: torch.Tensor | None = None) -> None:
        prefix, expert, which = match.group(1), int(match.group(2)), match.group(3)
        experts = self.model.get_submodule(prefix)
        if experts.packed != (scales is not None):
            raise ValueError(f"checkpoint tensor {disk_name!r} is {tensor.dtype}, but the config's experts are "
                             f"{'MXFP4' if experts.packed else 'not MXFP4'} (expert_dtype)")
        expert -= experts.first_expert
        tensor = self._expert_part(experts, which, tensor, experts.packed)
        scales = self._expert_part(experts, which, scales, True) if scales is not None else None
        inter = experts.num_local_inter
        rows = {"w1": slice(0, inter), "w3": slice(inter, 2 * inter), "w2": slice(None)}[which]
        stack = "w2" if which == "w2" else "w13"
        if experts.packed:
            copy_weight(getattr(experts, f"{stack}_blocks")[expert, rows], disk_name, tensor)
            copy_weight(getattr(experts, f"{stack}_scales")[expert, rows], disk_name + " (scale)", scales)
        else:
            copy_weight(getattr(experts, stack)[expert, rows], disk_name, tensor)
        self.loaded.add(f"{prefix}.{expert}.{which}")

    def _stacked(self, match: re.Match, disk_name: str, tensor: torch.Tensor) -> None:
        experts = self.model.get_submodule(match.group(1))
        if experts.packed:
            raise ValueError(f"checkpoint tensor {disk_name!r} holds unquantized experts, but the config says "
                             f"MXFP4 experts (expert_dtype fp4)")
        tensor = self._stacked_part(experts, match.group(2), tensor)
        if match.group(2) == "gate_up_proj":
            copy_weight(experts.w13, disk_name, tensor)
            names = ("w1", "w3")
        else:
            copy_weight(experts.w2, disk_name, tensor)
            names = ("w2",)
        self.loaded.update(f"{match.group(1)}.{e}.{w}" for e in range(tensor.shape[0]) for w in names)

    def _stacked_part(self, experts: nn.Module, kind: str, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's experts, or every expert's intermediate share, of a stacked [E, ...] tensor."""
        parallel = self.parallel
        if parallel.world_size == 1:
            return tensor
        if parallel.enable_expert_parallel:
            return load_shard(tensor, 0, experts.first_expert, experts.num_local_experts)
        inter = experts.num_local_inter
        if kind == "down_proj":
            return load_shard(tensor, 2, parallel.rank * inter, inter)
        return torch.cat([load_shard(tensor, 1, start + parallel.rank * inter, inter)       # gate rows, up rows
                          for start in (0, inter * parallel.world_size)], dim=1)

    def finish(self) -> None:
        if self.pending:
            weight_name, entry = next(iter(self.pending.items()))
            have = "weight" if "weight" in entry else "scale"
            raise ValueError(f"checkpoint tensor {entry[have + '_name']!r} has no matching "
                             f"{'scale' if have == 'weight' else 'weight'} ({weight_name})")
        expected = set()
        for name in self.params:
            if name.endswith(".attn.wx.weight"):                 # its blocks, by their checkpoint names
                attn = name[:-len(".wx.weight")]
                expected.update(f"{attn}.{part}.weight" for part in self.model.get_submodule(attn).wx.parts)
                continue
            owner, _, leaf = name.rpartition(".")
            if isinstance(projection := self._attribute(owner), Fp8Projection):     # its parts, likewise
                prefix = owner.rpartition(".")[0]
                expected.update(f"{prefix}.{part}.{leaf}" for part in projection.parts)
                continue
            stack = re.match(r"^(layers\.\d+\.ffn\.experts)\.(w13|w2)(_blocks|_scales)?$", name)
            if stack is None:
                expected.add(name)
                continue
            num = self.params[name].shape[0]
            names = ("w1", "w3") if stack.group(2) == "w13" else ("w2",)
            expected.update(f"{stack.group(1)}.{e}.{w}" for e in range(num) for w in names)
        check_loaded(expected, self.loaded)


def load_checkpoint(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                    rename: Callable[[str], str | None] = main_model_name) -> None:
    """Consume every checkpoint tensor whose DeepSeek name `rename` maps to one of the model's (None: not
    this model's); raise ValueError naming the tensor on anything missing, unexpected, or whose scale grid
    does not fit it."""
    loader = _Loader(model, rename)
    for name, tensor in weights:
        loader.add(name, tensor)
    loader.finish()
