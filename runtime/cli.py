"""`run-model [ARCH] --model PATH|HUB_ID|tiny --prompt TEXT`; `run-model [ARCH] ... --serve` or
`run-model serve MODEL`; `run-model --list`. Without ARCH, the architecture comes from the checkpoint's
config.json."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from runtime.config import EngineConfig
from runtime.request import RequestOutput, SamplingParams


def _engine_flags(parser: argparse.ArgumentParser) -> None:
    defaults = EngineConfig()
    group = parser.add_argument_group("engine")
    group.add_argument("--model", help="local dir, Hugging Face hub id, or 'tiny' (default: the package's model)")
    group.add_argument("--tokenizer", help="tokenizer dir or hub id (default: the model's)")
    group.add_argument("--load-format", default=defaults.load_format, choices=["auto", "dummy"])
    group.add_argument("--device", default=defaults.device)
    group.add_argument("--dtype", default=defaults.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    group.add_argument("--max-model-len", type=int)
    group.add_argument("--max-num-seqs", type=int, default=defaults.max_num_seqs)
    group.add_argument("--max-num-batched-tokens", type=int, default=defaults.max_num_batched_tokens)
    group.add_argument("--block-size", type=int, default=defaults.block_size,
                       help="token positions per KV block (default: 16, or the smallest multiple of 16 that the "
                            "model's compression ratios divide)")
    group.add_argument("--num-gpu-blocks", type=int, help="force the number of KV blocks")
    group.add_argument("--gpu-memory-utilization", type=float, default=defaults.gpu_memory_utilization)
    group.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs")
    group.add_argument("--piecewise-cuda-graphs", action="store_true",
                       help="also replay prefill and mixed batches from graphs captured around attention")
    group.add_argument("--no-async-scheduling", action="store_true",
                       help="wait for each step's tokens before scheduling the next (no host/device overlap)")
    group.add_argument("--no-prefix-caching", action="store_true")
    group.add_argument("--seed", type=int, default=defaults.seed)
    group.add_argument("--tensor-parallel-size", "-tp", type=int, default=defaults.tensor_parallel_size,
                       help="shard the model over this many devices (one process each)")
    group.add_argument("--enable-expert-parallel", action="store_true",
                       help="MoE models: split the experts over the tensor-parallel ranks")
    group.add_argument("--kv-cache-dtype", default=defaults.kv_cache_dtype,
                       choices=["auto", "bfloat16", "fp8", "fp8_e4m3"],
                       help="KV cache precision: auto (the model dtype) or fp8 e4m3 with a per-tensor scale "
                            "(about twice the cache capacity)")
    group.add_argument("--kv-cache-dtype-skip-layers", default="", choices=["", "sliding_window"],
                       help="under --kv-cache-dtype fp8, keep these layers at the model dtype")
    group.add_argument("--speculative-config", help='JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 3}\' '
                       "(methods: ngram, and the model package's own, e.g. mtp)")


def _sampling_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the CLI default)")
    group.add_argument("--top-p", type=float, default=1.0)
    group.add_argument("--top-k", type=int, default=0)
    group.add_argument("--min-p", type=float, default=0.0)
    group.add_argument("--max-tokens", type=int, default=64)
    group.add_argument("--min-tokens", type=int, default=0)
    group.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    group.add_argument("--stop-token-ids", type=int, nargs="*", default=[])
    group.add_argument("--ignore-eos", action="store_true")
    group.add_argument("--logprobs", type=int)
    group.add_argument("--presence-penalty", type=float, default=0.0)
    group.add_argument("--frequency-penalty", type=float, default=0.0)
    group.add_argument("--repetition-penalty", type=float, default=1.0)
    group.add_argument("-n", "--n", type=int, default=1)
    group.add_argument("--sampling-seed", type=int, help="per-request seed (reproducible sampling)")


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every flag's help names its default (argparse's own formatter skips flags without help text)."""
    for action in parser._actions:
        text = action.help or ""
        if action.default not in (None, False, [], argparse.SUPPRESS) and "default" not in text:
            action.help = (text + " " if text else "") + "(default: %(default)s)"


def _server_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("server (with --serve; the sampling flags are per request there)")
    group.add_argument("--serve", action="store_true", help="serve the OpenAI API instead of generating")
    group.add_argument("--host", default="127.0.0.1")
    group.add_argument("--port", type=int, default=8000, help="0 = any free port")
    group.add_argument("--api-key", action="append", default=[],
                       help="required bearer token for /v1/* (repeatable; default: $RUN_MODEL_API_KEY, else none)")
    group.add_argument("--served-model-name", nargs="+", help="model name(s) clients send (default: --model)")
    group.add_argument("--shutdown-timeout", type=float, default=10.0,
                       help="seconds in-flight requests get to finish on SIGINT/SIGTERM before they are aborted")
    group.add_argument("--max-request-bytes", type=int,
                       help="largest request body (default: 2 MiB + 128 bytes per token of --max-model-len)")
    group.add_argument("--chat-render-timeout", type=float, default=10.0, help="seconds a chat may take to render")
    group.add_argument("--stats-interval", type=float, default=10.0,
                       help="seconds between stats lines while busy (0 = none)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="run-model",
        description="Run an LLM: offline prompts or a server. `run-model serve MODEL` serves MODEL.")
    parser.add_argument("arch", nargs="?", help="model package (see --list); default: from the checkpoint's "
                        "config.json")
    parser.add_argument("serve_model", nargs="?", metavar="MODEL", help="with `serve`: the model to serve")
    parser.add_argument("--list", action="store_true", help="list the model packages and exit")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    _engine_flags(parser)
    _sampling_flags(parser)
    _server_flags(parser)
    _show_defaults(parser)
    return parser


def engine_config(args: argparse.Namespace, package) -> EngineConfig:
    """The engine's options; without a package the checkpoint's config.json picks the architecture."""
    model = args.model or (package.default_model if package is not None else None) or "tiny"
    return EngineConfig(
        model=model, arch=package.name if package is not None else None, tokenizer=args.tokenizer,
        device=args.device, dtype=args.dtype, load_format=args.load_format, block_size=args.block_size,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching,
        num_gpu_blocks=args.num_gpu_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager, piecewise_cuda_graphs=args.piecewise_cuda_graphs,
        async_scheduling=not args.no_async_scheduling, seed=args.seed,
        speculative_config=args.speculative_config, kv_cache_dtype=args.kv_cache_dtype,
        kv_cache_dtype_skip_layers=args.kv_cache_dtype_skip_layers, tensor_parallel_size=args.tensor_parallel_size,
        enable_expert_parallel=args.enable_expert_parallel)


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        n=args.n, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
        seed=args.sampling_seed, max_tokens=args.max_tokens, min_tokens=args.min_tokens, stop=args.stop,
        stop_token_ids=args.stop_token_ids, ignore_eos=args.ignore_eos, logprobs=args.logprobs,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty)


def _list_packages() -> None:
    from runtime.registry import discover
    for package in discover().values():
        print(f"{package.name:16s} {', '.join(package.hf_architectures):48s} default: {package.default_model}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if args.list:
        _list_packages()
        return 0
    if args.arch == "serve":                   # `run-model serve MODEL`, as vLLM spells it
        args.arch, args.serve = None, True
        args.model = args.serve_model or args.model
    elif args.serve_model:
        parser.error(f"unexpected argument {args.serve_model!r} (did you mean `run-model serve MODEL`?)")
    if not args.arch and not args.model:
        parser.error("give an architecture (see `run-model --list`) or --model")
    try:
        from runtime.engine import LLM
        from runtime.registry import get_package
        package = get_package(args.arch) if args.arch else None
        if args.serve:
            return _serve(args, package)
        params = sampling_params(args)
        llm = LLM(config=engine_config(args, package))
        return _generate(llm, args.prompt or ["Hello, my name is"], params, args.chat)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace, package) -> int:
    from runtime.engine import Engine
    from runtime.serve import ServerOptions, bind_socket, serve
    api_keys = args.api_key or [key for key in [os.environ.get("RUN_MODEL_API_KEY")] if key]
    options = ServerOptions(host=args.host, port=args.port, api_keys=tuple(api_keys),
                            served_model_names=tuple(args.served_model_name or ()),
                            shutdown_timeout=args.shutdown_timeout, max_request_bytes=args.max_request_bytes,
                            chat_render_timeout=args.chat_render_timeout, stats_interval=args.stats_interval)
    config = engine_config(args, package)
    sock = bind_socket(args.host, args.port)     # a busy port is reported now, not after minutes of loading
    return serve(Engine(config), options, sock)


def _generate(llm, prompts: list[str], params: SamplingParams, chat: bool) -> int:
    """Generate offline. One prompt with one completion streams its text as it comes; several show a progress
    bar. Ctrl-C stops and prints what was generated so far (exit status 130)."""
    engine = llm.engine
    inputs: list[str | list[int]] = list(prompts)
    if chat:
        options = {"add_generation_prompt": True}
        inputs = [engine.package.chat_prompt(llm.tokenizer, [{"role": "user", "content": p}], options) for p in prompts]
    ids = [f"cli-{i}" for i in range(len(inputs))]
    for request_id, prompt in zip(ids, inputs):
        engine.add_request(request_id, prompt, params, stream=True)
    live = len(ids) == 1 and params.n == 1
    latest: dict[str, RequestOutput] = {}
    interrupted = False
    if live:
        print(f"--- prompt: {prompts[0]!r}", flush=True)
    from tqdm import tqdm
    with tqdm(total=len(ids), desc="generating", unit="prompt", disable=live, file=sys.stderr) as bar:
        try:
            while engine.has_unfinished():
                for output in engine.step():
                    shown = latest.get(output.request_id)
                    latest[output.request_id] = output
                    bar.update(output.finished)
                    if live:
                        print(output.text[len(shown.text) if shown is not None else 0:], end="", flush=True)
        except KeyboardInterrupt:
            interrupted = True        # the engine is left mid-step; the process ends after printing
    if live:
        print()
    for prompt, request_id in zip(prompts, ids):
        output = latest.get(request_id)
        completions = output.outputs if output is not None else []
        for completion in completions:
            reason = completion.finish_reason or "interrupted"
            if not live:
                print(f"--- prompt: {prompt!r}  [{reason}, {len(completion.token_ids)} tokens]")
                print(completion.text)
            else:
                print(f"[{reason}, {len(completion.token_ids)} tokens]")
            if completion.logprobs is not None:
                _print_logprobs(llm.tokenizer, completion.token_ids, completion.logprobs)
    if interrupted:
        print("interrupted: the output above is what was generated before Ctrl-C", file=sys.stderr)
        return 130
    return 0


def _print_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]]) -> None:
    """One line per token: the token, its logprob, and the top alternatives."""
    for token_id, entry in zip(token_ids, logprobs):
        top = sorted(entry.items(), key=lambda item: -item[1])
        alternatives = "  ".join(f"{tokenizer.decode([t], skip_special_tokens=False)!r} {lp:.3f}" for t, lp in top)
        print(f"  {tokenizer.decode([token_id], skip_special_tokens=False)!r:>16} {entry[token_id]:8.3f}   "
              f"{alternatives}")


if __name__ == "__main__":
    sys.exit(main())
