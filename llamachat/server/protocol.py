"""The request bodies the server takes, as pydantic models, and what they mean for a backend
reply (ReplyRequest). Unknown fields are accepted, since clients send many; a known field
that would change the answer in a way the engine cannot honour yet is refused by name."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..backends.base import ReplyRequest, Sampling
from .errors import ApiError, unsupported


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class RequestMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class _Generation(BaseModel):
    """The fields chat completions and completions share."""

    model_config = ConfigDict(extra="allow")

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    logprobs: Any = None
    top_logprobs: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # llamachat's own, as llama.cpp's server names them.
    top_k: int | None = None
    min_p: float | None = None
    repeat_penalty: float | None = None
    repetition_penalty: float | None = None  # vLLM's name for it, so vLLM's clients work too

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def check_supported(self) -> None:
        if self.n is not None and self.n != 1:
            raise unsupported("n", "more than one choice")
        if self.logit_bias:
            raise unsupported("logit_bias", "a logit bias")

    def reply_request(self, max_tokens: int | None, logprobs: int | None = None) -> ReplyRequest:
        try:
            sampling = Sampling(
                temperature=self.temperature,
                top_k=self.top_k,
                top_p=self.top_p,
                min_p=self.min_p,
                repeat_penalty=(
                    self.repeat_penalty
                    if self.repeat_penalty is not None
                    else self.repetition_penalty
                ),
                frequency_penalty=self.frequency_penalty,
                presence_penalty=self.presence_penalty,
                seed=self.seed,
            )
        except ValueError as error:
            raise ApiError(400, str(error), str(error).split()[0]) from None
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        if any(not s for s in stop):
            raise ApiError(400, "stop strings must not be empty", "stop")
        chosen = sampling if sampling.chosen() else None
        return ReplyRequest(
            sampling=chosen, max_tokens=max_tokens, stop=tuple(stop), logprobs=logprobs
        )


class ChatCompletionRequest(_Generation):
    messages: list[RequestMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    # vLLM's extension: go on with the final message, an assistant's, left open (the reply is
    # what follows it), instead of opening a new assistant turn after it.
    continue_final_message: bool = False
    add_generation_prompt: bool = True

    def check_supported(self) -> None:
        super().check_supported()
        if self.continue_final_message:
            if self.add_generation_prompt:
                raise ApiError(
                    400,
                    "continue_final_message needs add_generation_prompt: false",
                    "add_generation_prompt",
                )
            if self.messages[-1].role != "assistant":
                raise ApiError(
                    400,
                    "continue_final_message needs the last message to be the assistant's",
                    "messages",
                )
        elif not self.add_generation_prompt:
            raise unsupported("add_generation_prompt", "a prompt without the reply's turn opened")
        if self.logprobs not in (None, False, True):
            raise ApiError(400, "logprobs must be true or false", "logprobs")
        if self.top_logprobs is not None:
            if not 0 <= self.top_logprobs <= 20:
                raise ApiError(400, "top_logprobs must be between 0 and 20", "top_logprobs")
            if not self.logprobs:
                raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")
        if self.tools:
            raise unsupported("tools", "tool calling")
        if self.tool_choice not in (None, "none", "auto"):
            raise unsupported("tool_choice", "tool calling")
        if self.functions or self.function_call not in (None, "none", "auto"):
            raise unsupported("functions", "function calling")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise unsupported("response_format", f"{self.response_format.get('type')!r} output")

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the backend takes them: roles and plain text."""
        return conversation(self.messages)

    def to_reply_request(self) -> ReplyRequest:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        request = self.reply_request(self.max_completion_tokens or self.max_tokens, logprobs)
        return replace(request, continue_reply=self.continue_final_message)


class CompletionRequest(_Generation):
    prompt: str | list[str]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        logprobs = self.logprobs
        if logprobs is not None and (type(logprobs) is not int or not 0 <= logprobs <= 5):
            raise ApiError(400, "logprobs must be an integer between 0 and 5", "logprobs")
        if self.echo:
            raise unsupported("echo", "echoing the prompt")
        if self.best_of not in (None, 1):
            raise unsupported("best_of", "more than one candidate")
        if self.suffix:
            raise unsupported("suffix", "a suffix (fill in the middle)")
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            raise unsupported("prompt", "a batch of prompts in one request")

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]

    def to_reply_request(self) -> ReplyRequest:
        return self.reply_request(self.max_tokens, self.logprobs)


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize for a conversation: how many tokens it takes, templated (what a client
    fits a conversation to the window by)."""

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[RequestMessage] = Field(min_length=1)


def conversation(messages: list[RequestMessage]) -> list[dict[str, str]]:
    """Request messages as the backend takes them: roles and plain text."""
    turns = []
    for i, message in enumerate(messages):
        if message.role in ("tool", "function"):
            raise unsupported(f"messages[{i}].role", f"the {message.role!r} role")
        if message.content is None:
            raise ApiError(400, "a message needs content", f"messages[{i}].content")
        if isinstance(message.content, str):
            text = message.content
        else:
            pieces = []
            for j, part in enumerate(message.content):
                if part.type != "text" or part.text is None:
                    where = f"messages[{i}].content[{j}].type"
                    raise unsupported(where, f"a content part of type {part.type!r}")
                pieces.append(part.text)
            text = "".join(pieces)
        role = "system" if message.role == "developer" else message.role
        turns.append({"role": role, "content": text})
    return turns
