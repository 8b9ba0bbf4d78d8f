"""mHC: the residual is `hc_mult` streams. Before a sublayer a learned projection of all streams gives `pre`
(how to collapse them into the sublayer's input), `post` (how to spread its output back) and `comb` (how the
streams mix), the last made doubly stochastic by Sinkhorn iterations. Computed in fp32 as transformers does."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels


def _unweighted_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class HyperConnection(nn.Module):
    """The parameters of one sublayer's connection, named as on disk: `{prefix}_fn`, `_base`, `_scale`."""

    def __init__(self, config):
        super().__init__()
        n = self.hc_mult = config.hc_mult
        self.sinkhorn_iters, self.hc_eps, self.norm_eps = config.hc_sinkhorn_iters, config.hc_eps, config.rms_norm_eps
        self.fn = nn.Parameter(torch.zeros((2 + n) * n, n * config.hidden_size, dtype=torch.float32))
        self.base = nn.Parameter(torch.zeros((2 + n) * n, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float32))

    def pre(self, streams: torch.Tensor, norm: nn.Module | None = None,
            mix: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """streams [num_tokens, n, hidden] -> (post [num_tokens, n], comb [num_tokens, n, n], input
        [num_tokens, hidden]), the input through the sublayer's `norm` if given. `mix`: the partial projections
        the previous `post` computed for this connection (kernels.hc_post), else the kernel path runs a GEMM."""
        if kernels.use_kernels(streams):
            return kernels.hc_pre(streams, self.fn, self.base, self.scale, self.norm_eps, self.hc_eps,
                                  self.sinkhorn_iters, mix, norm)
        n = self.hc_mult
        mix = F.linear(_unweighted_norm(streams.flatten(1).float(), self.norm_eps), self.fn.float())
        pre_w, post_w, comb_w = mix.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.split([n, n, n * n])
        pre_s, post_s, comb_s = self.scale.unbind(0)
        pre = torch.sigmoid(pre_w * pre_s + pre_b) + self.hc_eps
        post = 2 * torch.sigmoid(post_w * post_s + post_b)
        comb = torch.softmax(comb_w.view(-1, n, n) * comb_s + comb_b.view(n, n), dim=-1) + self.hc_eps
        comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        for _ in range(self.sinkhorn_iters - 1):
            comb = comb / (comb.sum(dim=-1, keepdim=True) + self.hc_eps)
            comb = comb / (comb.sum(dim=-2, keepdim=True) + self.hc_eps)
        collapsed = (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)
        return post, comb, norm(collapsed) if norm is not None else collapsed

    @staticmethod
    def post(output: torch.Tensor, streams: torch.Tensor, post: torch.Tensor, comb: torch.Tensor,
             following: HyperConnection | None = None,
             addend: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """New streams: each gets post_k * output plus sum_j comb[j, k] * stream_j; the sublayer's output is
        output + addend when given (a sum its sublayer left to this launch). -> (streams, mix): with the
        `following` connection (a few tokens on the kernel path), `mix` is its partial projections of the new
        streams, computed in the same launch, for its `pre`; else None."""
        if kernels.use_kernels(streams):
            if following is not None and streams.shape[0] <= kernels.HC_MIX_MAX_TOKENS:
                return kernels.hc_post(output, streams, post, comb, following.fn, addend)
            return kernels.hc_post(output, streams, post, comb, addend=addend), None
        if addend is not None:
            output = output + addend
        dtype = streams.dtype
        return post.to(dtype).unsqueeze(-1) * output.unsqueeze(-2) + \
            torch.matmul(comb.to(dtype).transpose(-1, -2), streams), None


class HyperHead(nn.Module):
    """Collapses the streams once after the last layer (no Sinkhorn)."""

    def __init__(self, config):
        super().__init__()
        n = config.hc_mult
        self.hc_eps, self.norm_eps = config.hc_eps, config.rms_norm_eps
        self.fn = nn.Parameter(torch.zeros(n, n * config.hidden_size, dtype=torch.float32))
        self.base = nn.Parameter(torch.zeros(n, dtype=torch.float32))
        self.scale = nn.Parameter(torch.ones(1, dtype=torch.float32))

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        if kernels.use_kernels(streams):
            return kernels.hc_head(streams, self.fn, self.base, self.scale, self.norm_eps, self.hc_eps)
        mix = F.linear(_unweighted_norm(streams.flatten(1).float(), self.norm_eps), self.fn.float())
        pre = torch.sigmoid(mix * self.scale.float() + self.base.float()) + self.hc_eps
        return (pre.unsqueeze(-1) * streams).sum(dim=1).to(streams.dtype)
