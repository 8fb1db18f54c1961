"""The OpenAI wire format: request, response, streaming-chunk and error models, all in one module.

Shapes follow OpenAI's API (and vLLM's OpenAI server, whose extensions `top_k`, `min_p`, `repetition_penalty`,
`ignore_eos`, `min_tokens`, `stop_token_ids`, `skip_special_tokens`, `add_generation_prompt` are accepted too).
Unknown request fields are accepted and ignored, as OpenAI's and vLLM's servers do. Every text field that reaches
the tokenizer, the detokenizer or a capture record must be valid Unicode: JSON can carry lone UTF-16 surrogates
("\\ud800") that no tokenizer accepts, and they are a 400 naming the field.

lkserve's own additions:
- request: an `lkserve` object `{"capture": bool, "tags": {str: str}}` (capture opt-out and domain/tenant tags
  carried into capture records); top-level `capture`/`tags` are accepted as a shorthand.
- response: `usage.speculative` with this request's speculative-decoding statistics.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

# Limits that keep one request from asking for unbounded work. Larger values are a client error (400).
MAX_N = 8
MAX_PROMPTS = 16
MAX_CHOICES = 16
MAX_STOP = 16
MAX_STOP_LEN = 256
MAX_TAGS = 16
MAX_TAG_LEN = 128
MAX_LOGPROBS = 20
MAX_SEED = 2**63 - 1


def _valid_unicode(text: str) -> str:
    """Lone surrogates survive JSON decoding but not UTF-8 encoding: refuse them here, not in the tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PydanticCustomError(
            "invalid_unicode",
            "text must be valid Unicode, found a lone UTF-16 surrogate U+{code} at character {pos}",
            {"code": f"{ord(text[e.start]):04X}", "pos": e.start},
        ) from None
    return text


# pydantic refuses invalid Unicode itself in a length-constrained str (error `string_unicode`); `Text` is for the
# unconstrained ones.
Text = Annotated[str, AfterValidator(_valid_unicode)]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    """Requests: extra fields allowed (OpenAI clients send fields we do not know; they are ignored)."""

    model_config = ConfigDict(extra="allow")


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------------------------------------ errors
class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(ResponseModel):
    error: ErrorInfo


# ------------------------------------------------------------------------------------------------ extensions
TagKey = Annotated[str, Field(min_length=1, max_length=MAX_TAG_LEN, pattern=r"^[A-Za-z0-9_.:\-]+$")]
TagValue = Annotated[str, Field(max_length=MAX_TAG_LEN)]


class LkserveOptions(BaseModel):
    """Per-request lkserve extension: `"lkserve": {"capture": false, "tags": {"domain": "code"}}`."""

    model_config = ConfigDict(extra="forbid")

    capture: bool | None = Field(None, description="false = never record this request (opt-out); null = default")
    tags: dict[TagKey, TagValue] | None = Field(
        None, max_length=MAX_TAGS, description="carried into capture records, e.g. domain/tenant"
    )


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


StopParam = Annotated[str, Field(max_length=MAX_STOP_LEN)] | Annotated[
    list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_LEN)]], Field(max_length=MAX_STOP)
] | None
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]


class _SamplingFields(OpenAIModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model: Text | None = Field(None, description="served model name; null = the one served model")
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=1_000_000, description="extension: 0 or -1 = disabled")
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-MAX_SEED, le=MAX_SEED)
    stop: StopParam = None
    stop_token_ids: list[TokenId] | None = Field(None, max_length=MAX_STOP)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, le=1_000_000)
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    logit_bias: dict[str, float] | None = None
    # lkserve extensions
    lkserve: LkserveOptions | None = None
    capture: bool | None = Field(None, description="shorthand for lkserve.capture")
    tags: dict[TagKey, TagValue] | None = Field(None, max_length=MAX_TAGS, description="shorthand for lkserve.tags")

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, v):
        if isinstance(v, str) and v == "":
            return None
        return v

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def capture_opt(self) -> bool:
        """False when the client opted out of capture."""
        for v in ((self.lkserve.capture if self.lkserve else None), self.capture):
            if v is False:
                return False
        return True

    def capture_tags(self) -> dict[str, str] | None:
        tags: dict[str, str] = {}
        if self.tags:
            tags.update(self.tags)
        if self.lkserve and self.lkserve.tags:
            tags.update(self.lkserve.tags)
        if self.user:
            tags.setdefault("user", self.user)
        return tags or None


def _common_unsupported(req: _SamplingFields) -> tuple[str, str] | None:
    if req.logit_bias:
        return "logit_bias is not supported", "logit_bias"
    return None


# ------------------------------------------------------------------------------------------------ completions
PromptParam = (
    Annotated[str, Field(max_length=1_000_000)]
    | Annotated[list[Annotated[str, Field(max_length=1_000_000)]], Field(min_length=1, max_length=MAX_PROMPTS)]
    | Annotated[list[TokenId], Field(min_length=1)]
    | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)]
)


class CompletionRequest(_SamplingFields):
    prompt: PromptParam
    max_tokens: int | None = Field(16, ge=1, description="null = up to the context window")
    echo: bool | None = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: Text | None = None
    best_of: int | None = Field(None, ge=1, le=MAX_N)

    def unsupported(self) -> tuple[str, str] | None:
        """(message, param) for a well-formed but unsupported request, else None."""
        if self.suffix:
            return "suffix is not supported", "suffix"
        if self.best_of is not None and self.best_of != self.n:
            return "best_of other than n is not supported", "best_of"
        return _common_unsupported(self)


class CompletionLogprobs(ResponseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class SpeculativeUsage(ResponseModel):
    """This request's speculative decoding: how many draft tokens were proposed and accepted."""

    draft_version: str | None = None
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    acceptance_rate: float | None = None
    mean_acceptance_length: float | None = Field(
        None, description="tokens produced per target forward pass: 1 + accepted / drafts"
    )
    accepted_per_position: list[int] = Field(default_factory=list)


class UsageInfo(ResponseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    speculative: SpeculativeUsage | None = None


class CompletionChoice(ResponseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None


class CompletionResponse(ResponseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None


class CompletionStreamResponse(CompletionResponse):
    pass


# ------------------------------------------------------------------------------------------------ chat
class TextContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    # declared before `content`, whose validator reads them
    tool_calls: list[dict[str, Any]] | None = None
    function_call: dict[str, Any] | None = None
    content: Text | list[TextContentPart] | None = Field(None, validate_default=True)
    name: Text | None = None

    @field_validator("content")
    @classmethod
    def _content_required(cls, v, info: ValidationInfo):
        """OpenAI's rule: content may be null (or absent) only in an assistant message that carries tool_calls or a
        function_call, and in a (deprecated) function message."""
        role = info.data.get("role")
        if v is not None or role is None or role == "function":
            return v
        if role == "assistant" and (info.data.get("tool_calls") or info.data.get("function_call")):
            return v
        raise PydanticCustomError(
            "content_required",
            "expected a string or a list of text parts, got null: content may be null only in an assistant "
            "message with tool_calls",
        )

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="deprecated by OpenAI: max_completion_tokens")
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(message, param) for a well-formed but unsupported request, else None."""
        if self.tools:
            return "tools are not supported", "tools"
        if self.response_format and self.response_format.get("type", "text") != "text":
            return "only response_format {'type': 'text'} is supported", "response_format"
        if self.top_logprobs and not self.logprobs:
            return "top_logprobs requires logprobs=true", "top_logprobs"
        if self.continue_final_message and self.add_generation_prompt:
            return "continue_final_message and add_generation_prompt cannot both be true", "continue_final_message"
        if self.continue_final_message and self.messages[-1].role != "assistant":
            return "continue_final_message needs a final assistant message", "messages"
        return _common_unsupported(self)

    def effective_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class ChatLogprobTop(ResponseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatLogprobToken(ChatLogprobTop):
    top_logprobs: list[ChatLogprobTop] = Field(default_factory=list)


class ChatLogprobs(ResponseModel):
    content: list[ChatLogprobToken] | None = None


class ChatResponseMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatCompletionChoice(ResponseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None


class DeltaMessage(ResponseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionStreamChoice(ResponseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionStreamResponse(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionStreamChoice]
    system_fingerprint: str | None = None
    usage: UsageInfo | None = None


# ------------------------------------------------------------------------------------------------ models
class ModelCard(ResponseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "lkserve"
    root: str | None = None
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ------------------------------------------------------------------------------------------------ health
class HealthResponse(ResponseModel):
    status: Literal["ok"] = "ok"


class ReadyResponse(ResponseModel):
    status: Literal["ready", "not_ready"]
    model: str | None = None
    draft_version: str | None = None
    draft_sha256: str | None = None
    reason: str | None = None


# ------------------------------------------------------------------------------------------------ admin
class DraftHistoryEntry(ResponseModel):
    version: str
    path: str | None = None
    sha256: str | None = None
    source: Literal["startup", "announcement", "admin_promote", "admin_rollback"]
    ok: bool
    reason: str | None = None
    seconds: float | None = None
    at: float


class DraftStatus(ResponseModel):
    version: str | None
    sha256: str | None = None
    channel: str | None = None
    subscriber_running: bool = False
    announcements_received: int = 0
    last_error: str | None = None
    history: list[DraftHistoryEntry]


class PromoteRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str = Field(min_length=1, max_length=256)
    path: str | None = Field(
        None, min_length=1, max_length=4096, description="checkpoint dir; null = a version seen before"
    )
    sha256: str | None = Field(None, pattern=r"^[0-9a-fA-F]{64}$")


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str | None = Field(
        None, min_length=1, max_length=256, description="null = the version served before the current one"
    )


class SwapResponse(ResponseModel):
    ok: bool
    version: str | None
    reason: str | None = None
    seconds: float | None = None


class AdaptationStatus(ResponseModel):
    paused: bool
    key: str


class CaptureStatus(ResponseModel):
    enabled: bool
    sample_rate: float


class CaptureUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool | None = None
    sample_rate: float | None = Field(None, ge=0.0, le=1.0)
