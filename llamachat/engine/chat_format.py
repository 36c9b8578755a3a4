"""Turning a conversation into the prompt text a model was trained on.

A model's own chat template (tokenizer_config.json, or the GGUF metadata) is used when it has
one. For models without one, built-in templates can be chosen by name; they are Jinja templates
rendered exactly as a model's own template would be (see tokenizer.py).
"""

from __future__ import annotations

from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import EngineError

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

ChatMessage = Mapping[str, str]  # {"role": "system" | "user" | "assistant", "content": ...}

MODEL_FORMAT = "model"  # the name under which a model's own template goes


@dataclass(frozen=True)
class ChatFormat:
    name: str
    template: str
    # Strings that end a reply even when the model emits no end-of-sequence token, as base and
    # lightly tuned models tend to go on to write the next turn themselves.
    stop: tuple[str, ...] = ()


_LLAMA2 = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system = messages[0]['content'] %}{% set messages = messages[1:] %}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token }}[INST] "
    "{% if loop.first and system is defined %}<<SYS>>\n{{ system }}\n<</SYS>>\n\n{% endif %}"
    "{{ message['content'] | trim }} [/INST]"
    "{% else %} {{ message['content'] | trim }} {{ eos_token }}{% endif %}"
    "{% endfor %}"
)

_LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

_CHATML = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_ALPACA = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] }}{% set messages = messages[1:] %}"
    "{% else %}Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
    "{% endif %}"
    "{% for message in messages %}"
    # A newline right after a block tag would be eaten (trim_blocks), so it is an expression.
    "{% if message['role'] == 'user' %}{{ '\\n\\n### Instruction:\\n' }}{{ message['content'] }}"
    "\n\n### Response:\n"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

_VICUNA = (
    "{{ bos_token }}"
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{{ messages[0]['content'] }}{% set messages = messages[1:] %}"
    "{% else %}A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %} USER: {{ message['content'] }} ASSISTANT:"
    "{% else %} {{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

BUILTIN_FORMATS: dict[str, ChatFormat] = {
    f.name: f
    for f in (
        ChatFormat("llama-2", _LLAMA2, stop=("[INST]",)),
        ChatFormat("llama-3", _LLAMA3, stop=("<|eot_id|>",)),
        ChatFormat("chatml", _CHATML, stop=("<|im_end|>",)),
        ChatFormat("alpaca", _ALPACA, stop=("### Instruction:",)),
        ChatFormat("vicuna", _VICUNA, stop=("USER:",)),
    )
}


def chat_format_for(tokenizer: Tokenizer, name: str | None = None) -> ChatFormat:
    """The format named, else the model's own template, else a built-in one that matches the
    model's special tokens (ChatML for <|im_start|>, Llama-3 for its headers, else Llama-2)."""
    if name and name != MODEL_FORMAT:
        try:
            return BUILTIN_FORMATS[name]
        except KeyError:
            known = ", ".join([MODEL_FORMAT, *BUILTIN_FORMATS])
            raise EngineError(f"unknown chat format {name!r}: choose one of {known}") from None
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates: the default is the chat one
        template = template.get("default")
    if template:
        return ChatFormat(MODEL_FORMAT, template)
    if name == MODEL_FORMAT:
        raise EngineError("this model has no chat template of its own; choose a built-in format")
    return builtin_for_vocabulary(tokenizer.vocabulary())


def builtin_for_vocabulary(vocabulary: Container[str]) -> ChatFormat:
    """The built-in format a template-less model most likely speaks, from its special tokens."""
    if "<|im_start|>" in vocabulary:
        return BUILTIN_FORMATS["chatml"]
    if "<|start_header_id|>" in vocabulary:
        return BUILTIN_FORMATS["llama-3"]
    return BUILTIN_FORMATS["llama-2"]


def render(
    tokenizer: Tokenizer,
    chat_format: ChatFormat,
    messages: Sequence[ChatMessage],
    continue_reply: bool = False,
) -> str:
    """The prompt text for `messages`, ending where the assistant's reply begins. With
    `continue_reply` the last message is an assistant's reply to go on with: the text ends with
    it, left open (no end of turn), as transformers' `continue_final_message` renders it."""
    if continue_reply and (not messages or messages[-1]["role"] != "assistant"):
        raise EngineError("only an assistant's reply, the conversation's last message, continues")
    reply = messages[-1]["content"] if continue_reply else ""
    if continue_reply and not reply.strip():
        messages = messages[:-1]  # nothing to go on from: a new reply is the same prompt
    open_reply = continue_reply and bool(reply.strip())
    try:
        text = tokenizer.render(chat_format.template, messages, not open_reply)
    except Exception as error:  # the template's own checks raise (e.g. roles out of order)
        raise EngineError(
            f"the {chat_format.name} chat template rejected the conversation: {error}"
        ) from None
    return _left_open(text, reply, chat_format.name) if open_reply else text


def _left_open(text: str, reply: str, name: str) -> str:
    """`text` (the whole conversation) cut right after the last message's own text, before
    what closes its turn; as transformers does, where the template trims the reply's edges the
    cut is after the trimmed text."""
    trimmed = reply.strip()
    at = text.rfind(trimmed)
    if at < 0:
        raise EngineError(f"the {name} chat template does not show the reply to continue")
    kept = reply.lstrip()
    return text[: at + (len(kept) if text[at : at + len(kept)] == kept else len(trimmed))]
