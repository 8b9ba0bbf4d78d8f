"""The wire protocol: request bodies, their validation (all in this module), and OpenAI-style errors.

A body is read and checked here before anything else sees it: its size (413), its media type (415), its
encoding and JSON (400: not UTF-8, lone UTF-16 surrogates, nesting past the parser's depth), then its
fields (the pydantic models below, then SamplingParams' ranges). Handlers get a valid body or an ApiError,
never a half-checked one."""
from __future__ import annotations

import json
import re
from typing import Any, AsyncIterator, Callable, Literal, TypeVar

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from runtime.request import SamplingParams
from runtime.structured import StructuredOutputsParams

MAX_N = 128                    # completions per prompt, as OpenAI allows
MAX_LOGPROBS = 20              # top alternatives per token
_MAX_SEED = 2**63 - 1 - MAX_N  # the engine gives completion i the seed `seed + i`, an int64


class ApiError(Exception):
    """An error the client caused (4xx) or the server could not avoid (5xx), in OpenAI's shape."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


# ---- request bodies ---------------------------------------------------------------------------------------

class _Body(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do, so newer clients keep working.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False


class GenerationBody(_Body):
    """Fields /v1/completions and /v1/chat/completions share, with the usual extras (top_k ... ignore_eos)."""
    model: str | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2**63, le=_MAX_SEED)
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[str, float] | None = None
    structured_outputs: dict[str, Any] | None = None     # vLLM's extra: json, json_object, regex, choice, grammar


class CompletionBody(GenerationBody):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)    # vLLM's extra
    suffix: str | None = None
    best_of: int | None = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    # Extra fields (tool_calls, name, reasoning_content, ...) go through to the chat template.
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None


class ChatBody(GenerationBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None                 # None = up to the context length
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    chat_template: str | None = None              # refused: see chat_options
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    response_format: dict[str, Any] | None = None

    def chat_options(self) -> dict[str, Any]:
        """The template's keyword arguments. A request may not bring its own template: rendering one runs
        the client's loops on the server (a one-request denial of service)."""
        options = dict(self.chat_template_kwargs or {})
        if self.chat_template is not None or "chat_template" in options:
            param = "chat_template" if self.chat_template is not None else "chat_template_kwargs"
            raise ApiError(400, "a request may not bring its own chat_template; the server renders chats "
                           "with the model's template", param=param)
        options["add_generation_prompt"] = self.add_generation_prompt
        if self.reasoning_effort is not None:
            options["reasoning_effort"] = self.reasoning_effort
        return options

    def forced_tool(self) -> tuple[bool, str | None]:
        """(whether the answer must be tool calls, the function it must call or None for any), checking
        `tools` and `tool_choice`; (False, None) for "auto" and "none"."""
        tools = self.tools or []
        for i, tool in enumerate(tools):
            function = tool.get("function")
            if tool.get("type") != "function" or not isinstance(function, dict) or \
                    not isinstance(function.get("name"), str):
                raise ApiError(400, f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\": ...}}}}",
                               param="tools")
        choice = self.tool_choice
        if choice is None or choice in ("auto", "none"):
            return False, None
        if not tools:
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        if choice == "required":
            return True, None
        name = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        if not isinstance(name, str):
            raise ApiError(400, 'tool_choice must be "none", "auto", "required" or {"type": "function", '
                           '"function": {"name": ...}}', param="tool_choice")
        if name not in {t["function"]["name"] for t in tools}:
            raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        return True, name

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages as chat templates expect them: content as one string, tool-call arguments as objects (a
        client sends them as JSON text), no empty tool_calls, reasoning under both of its names."""
        messages = []
        for i, message in enumerate(self.messages):
            data = message.model_dump(exclude_none=True)
            content = message.content
            data["content"] = "".join(p.text for p in content) if isinstance(content, list) else (content or "")
            if "tool_calls" in data:
                data["tool_calls"] = _parsed_tool_calls(data["tool_calls"], f"messages.{i}.tool_calls")
                if not data["tool_calls"]:
                    del data["tool_calls"]
            reasoning = data.get("reasoning_content", data.get("reasoning"))
            if isinstance(reasoning, str):
                data["reasoning_content"] = data["reasoning"] = reasoning
            messages.append(data)
        return messages


def _parsed_tool_calls(calls: Any, param: str) -> list[dict[str, Any]]:
    if not isinstance(calls, list):
        raise ApiError(400, f"{param} must be a list", param=param)
    parsed = []
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ApiError(400, f"{param} entries need function.name", param=param)
        arguments = function.get("arguments")
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise ApiError(400, f"{param}: function.arguments is not JSON", param=param) from None
        parsed.append({**call, "function": {**function, "arguments": arguments if arguments is not None else {}}})
    return parsed


class TokenizeBody(_Body):
    """/tokenize: a prompt, or chat messages rendered with the model's template."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeBody(_Body):
    model: str | None = None
    tokens: list[int]


_FIELD_NAMES = {name for body in (CompletionBody, ChatBody, ChatMessage, TextPart, StreamOptions, TokenizeBody,
                                  DetokenizeBody) for name in body.model_fields}


# ---- reading a body ---------------------------------------------------------------------------------------

async def read_body(chunks: AsyncIterator[bytes], content_type: str | None, limit: int) -> bytes:
    """The raw body, refused (413) as soon as it grows past `limit` bytes, and refused (415) unless it is
    JSON. A missing Content-Type is taken as JSON."""
    if content_type is not None:
        media_type = content_type.split(";", 1)[0].strip().lower()
        if media_type != "application/json" and not media_type.endswith("+json"):
            raise ApiError(415, f"the body must be JSON (Content-Type: application/json), got {media_type!r}")
    parts, size = [], 0
    async for chunk in chunks:
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the body is larger than this server's limit of {limit} bytes "
                           "(--max-request-bytes)")
        parts.append(chunk)
    return b"".join(parts)


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def parse_json(raw: bytes) -> Any:
    """JSON with strict UTF-8 and no lone surrogates. NaN and Infinity parse here so that the field holding
    one is named when the models below refuse it (allow_inf_nan=False). Big bodies: on a worker thread."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ApiError(400, f"the body is not valid UTF-8 (byte {exc.start})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc.msg} (at character {exc.pos})") from None
    except RecursionError:
        raise ApiError(400, "the body is not valid JSON here: it nests too deeply") from None
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(data):
        raise ApiError(400, "the body holds a lone UTF-16 surrogate escape (like \\ud800 without its pair), "
                       "which is no Unicode character")
    return data


def _has_lone_surrogate(value: Any) -> bool:
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif isinstance(item, dict):
            pending.extend(item.keys())
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return False


BodyT = TypeVar("BodyT", bound=BaseModel)


def validate(model: type[BodyT], data: Any) -> BodyT:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors()) from None
    except RecursionError:
        raise ApiError(400, "the body nests too deeply") from None


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    param = _field_path(errors[0].get("loc", ()))
    # a value that fits no member of a union (prompt: str | list[int] | ...) fails once per member
    reasons = dict.fromkeys(e.get("msg", "invalid value") for e in errors if _field_path(e.get("loc", ())) == param)
    return ApiError(400, f"{param or 'body'}: {'; or '.join(reasons)}", param=param)


def _field_path(location: tuple) -> str | None:
    """`messages.0.role` from pydantic's location, which also names union members (`prompt.list[int].0`)."""
    path = []
    for part in location[1:] if location[:1] == ("body",) else location:
        if isinstance(part, str) and part not in _FIELD_NAMES:
            break
        path.append(str(part))
    return ".".join(path) or None


# ---- from a body to the engine's parameters ---------------------------------------------------------------

def sampling_params(body: GenerationBody, max_tokens: int | None, logprobs: int | None,
                    renames: dict[str, str], vocab_size: int,
                    response_format: dict[str, Any] | None = None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """The request's sampling parameters. SamplingParams checks the ranges; its messages start with the
    field's name, which becomes the error's `param` (under the request's name for it)."""
    for token_id in body.stop_token_ids or []:
        if not 0 <= token_id < vocab_size:
            raise ApiError(400, f"stop_token_ids must be in [0, {vocab_size}), got {token_id}",
                           param="stop_token_ids")
    try:
        return SamplingParams(
            n=body.n, temperature=_or(body.temperature, 1.0), top_p=_or(body.top_p, 1.0),
            top_k=_or(body.top_k, 0), min_p=_or(body.min_p, 0.0), seed=body.seed, max_tokens=max_tokens,
            min_tokens=body.min_tokens, stop=body.stop, stop_token_ids=body.stop_token_ids,
            ignore_eos=body.ignore_eos, logprobs=logprobs, prompt_logprobs=prompt_logprobs,
            presence_penalty=_or(body.presence_penalty, 0.0),
            frequency_penalty=_or(body.frequency_penalty, 0.0),
            repetition_penalty=_or(body.repetition_penalty, 1.0),
            include_stop_str_in_output=body.include_stop_str_in_output,
            skip_special_tokens=body.skip_special_tokens,
            structured_outputs=structured_outputs(body.structured_outputs, response_format))
    except ValueError as exc:
        name = str(exc).split(" ", 1)[0]
        param = renames.get(name, name) if name in SamplingParams.__dataclass_fields__ else None
        raise ApiError(400, str(exc), param=param) from None


_STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


def structured_outputs(extra: dict[str, Any] | None, response_format: dict[str, Any] | None
                       ) -> StructuredOutputsParams | None:
    """The output constraint of `structured_outputs` (vLLM's extra) or the chat's `response_format`. Whether
    a schema or regex compiles is checked when the engine admits the request (a 400 all the same)."""
    kind = (response_format or {}).get("type", "text")
    if extra is not None and kind != "text":
        raise ApiError(400, "give either response_format or structured_outputs, not both", param="response_format")
    if extra is not None:
        given = {k: v for k, v in extra.items() if v is not None and v is not False}
        unknown = sorted(set(given) - set(_STRUCTURED_KINDS))
        if unknown:
            raise ApiError(400, f"structured_outputs.{unknown[0]} is not supported by this server (supported: "
                           f"{', '.join(_STRUCTURED_KINDS)})", param="structured_outputs")
        if "json" in given and not isinstance(given["json"], (str, dict)):
            raise ApiError(400, "structured_outputs.json must be a JSON schema (an object or its JSON text)",
                           param="structured_outputs")
        try:
            return StructuredOutputsParams(**given)
        except (TypeError, ValueError) as exc:
            raise ApiError(400, str(exc), param="structured_outputs") from None
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
            raise ApiError(400, "response_format json_schema needs json_schema.schema, a JSON schema object",
                           param="response_format")
        return StructuredOutputsParams(json=spec["schema"])
    raise ApiError(400, f"response_format type {kind!r} is not supported (text, json_object, json_schema)",
                   param="response_format")


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def reject_unsupported(body: BaseModel, fields: dict[str, Callable[[Any], bool]]) -> None:
    for name, used in fields.items():
        if used(getattr(body, name)):
            raise ApiError(400, f"{name} is not supported by this server", param=name)


def wants_usage_chunk(body: GenerationBody) -> bool:
    """Whether the stream ends with a usage chunk."""
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed with stream: true", param="stream_options")
    return body.stream_options is not None and body.stream_options.include_usage
