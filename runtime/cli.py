"""`run-model ARCH --model PATH|HUB_ID|tiny --prompt TEXT`; `run-model ARCH ... --serve`; `run-model --list`."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from runtime.config import EngineConfig
from runtime.request import SamplingParams


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
    group.add_argument("--no-async-scheduling", action="store_true",
                       help="wait for each step's tokens before scheduling the next (no host/device overlap)")
    group.add_argument("--no-prefix-caching", action="store_true")
    group.add_argument("--seed", type=int, default=defaults.seed)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="run-model", description="Run an LLM: offline prompts or a server.")
    parser.add_argument("arch", nargs="?", help="model package (see --list)")
    parser.add_argument("--list", action="store_true", help="list the model packages and exit")
    parser.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    _engine_flags(parser)
    _sampling_flags(parser)
    _server_flags(parser)
    return parser


def engine_config(args: argparse.Namespace, package) -> EngineConfig:
    return EngineConfig(
        model=args.model or package.default_model or "tiny", arch=package.name, tokenizer=args.tokenizer,
        device=args.device, dtype=args.dtype, load_format=args.load_format, block_size=args.block_size,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        max_model_len=args.max_model_len, enable_prefix_caching=not args.no_prefix_caching,
        num_gpu_blocks=args.num_gpu_blocks, gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager, async_scheduling=not args.no_async_scheduling, seed=args.seed,
        speculative_config=args.speculative_config)


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
    if not args.arch:
        parser.error("give an architecture (see `run-model --list`)")
    try:
        from runtime.engine import LLM
        from runtime.registry import get_package
        package = get_package(args.arch)
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
    from runtime.server import ServerOptions, serve
    api_keys = args.api_key or [key for key in [os.environ.get("RUN_MODEL_API_KEY")] if key]
    options = ServerOptions(host=args.host, port=args.port, api_keys=tuple(api_keys),
                            served_model_names=tuple(args.served_model_name or ()),
                            shutdown_timeout=args.shutdown_timeout)
    return serve(Engine(engine_config(args, package)), options)


def _generate(llm, prompts: list[str], params: SamplingParams, chat: bool) -> int:
    if chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    else:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        for completion in output.outputs:
            print(f"--- prompt: {prompt!r}  [{completion.finish_reason}, {len(completion.token_ids)} tokens]")
            print(completion.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
