"""run-model: a small LLM inference and serving engine."""
from runtime.config import EngineConfig
from runtime.engine import LLM, Engine
from runtime.request import CompletionOutput, RequestOutput, SamplingParams

__all__ = ["LLM", "Engine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput"]
