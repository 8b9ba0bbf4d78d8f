"""A second CUDA stream for work that runs beside the current stream's (the shared expert beside the routed
experts): in a CUDA graph the two become parallel branches, which fills the gaps a decode step's latency-bound
launches leave. RUN_MODEL_SIDE_STREAMS=0 keeps everything on one stream."""
from __future__ import annotations

import os

import torch

SIDE_STREAMS = os.environ.get("RUN_MODEL_SIDE_STREAMS") != "0"
_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(x: torch.Tensor) -> torch.cuda.Stream | None:
    """The side stream of x's device (made on first use, by an eager call before any graph capture), or None
    off a GPU or with side streams off. A caller forks with `side.wait_stream(current)`, and joins with
    `current.wait_stream(side)` before anything on the current stream reads the side stream's outputs; what
    the side stream reads stays referenced until the join (so the allocator cannot hand its memory to the
    current stream earlier), and what it allocates is reused only by itself, after a later fork."""
    if not (x.is_cuda and SIDE_STREAMS):
        return None
    if x.device not in _STREAMS:
        _STREAMS[x.device] = torch.cuda.Stream(x.device)
    return _STREAMS[x.device]
