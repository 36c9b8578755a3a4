"""Tokenizers: text ↔ token ids, special tokens, and chat templates rendered to prompt text.

Importing transformers costs seconds (1.5 s on a 2-core laptop-class CPU, 8 s on the lent GPU
machine), more than loading a small model. Most models ship a `tokenizer.json` that the
`tokenizers` library runs by itself, and chat templates are Jinja: for those, `FastTokenizer`
does the work without transformers, with the template environment Hugging Face documents for
chat templates (trim_blocks, lstrip_blocks, loop controls, `raise_exception`, `strftime_now`,
non-ASCII `tojson`, the `{% generation %}` block). Other tokenizer classes (sentencepiece-based
Llama-2 ones, whose transformers class adjusts the pipeline) go through transformers.
Tests check that both give the same ids, text and prompts.
"""

from __future__ import annotations

import datetime
import functools
import json
from collections.abc import Container, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from .errors import ModelLoadError

# tokenizer_config.json classes that are the tokenizer.json pipeline as it stands.
_PLAIN_CLASSES = {None, "TokenizersBackend", "PreTrainedTokenizerFast"}


class Tokenizer(Protocol):
    chat_template: str | dict[str, str] | None
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]: ...
    def decode(self, token_ids: Sequence[int]) -> str: ...
    def vocabulary(self) -> Container[str]: ...
    def special_tokens(self) -> frozenset[str]: ...
    def token_id(self, token: str) -> int | None: ...
    def render(
        self,
        template: str,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
    ) -> str: ...
    def __len__(self) -> int: ...


def load_tokenizer(folder: Path) -> Tokenizer:
    """The model folder's tokenizer, without transformers when its files allow."""
    config = _read_json(folder / "tokenizer_config.json")
    plain = (
        (folder / "tokenizer.json").exists()
        and config.get("tokenizer_class") in _PLAIN_CLASSES
        and not (folder / "chat_template.json").exists()
        and not (folder / "additional_chat_templates").exists()
    )
    return FastTokenizer(folder, config) if plain else TransformersTokenizer(folder)


class FastTokenizer:
    def __init__(self, folder: Path, config: dict[str, Any]):
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self._tokenizer = RustTokenizer.from_file(str(folder / "tokenizer.json"))
        except Exception as error:  # the Rust library raises its own exception type
            raise ModelLoadError(f"cannot load the tokenizer in {folder}: {error}") from None
        self._config = config
        self._clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.named = {
            key: _content(config[key])
            for key in ("bos_token", "eos_token", "unk_token", "pad_token")
            if config.get(key) is not None
        }
        self.chat_template = _chat_template(folder, config)
        eos = self.named.get("eos_token")
        self.eos_token_id = None if eos is None else self._tokenizer.token_to_id(eos)

    def encode(self, text: str) -> list[int]:
        # Chat templates write the BOS token themselves: add no special tokens here.
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, token_ids: Sequence[int]) -> str:
        text = self._tokenizer.decode(list(token_ids), skip_special_tokens=True)
        return _clean_up_spaces(text) if self._clean_up_spaces else text

    def vocabulary(self) -> Container[str]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def special_tokens(self) -> frozenset[str]:
        extra = [_content(t) for t in self._config.get("additional_special_tokens") or ()]
        added = self._tokenizer.get_added_tokens_decoder().values()
        return frozenset(
            [*self.named.values(), *extra, *(token.content for token in added if token.special)]
        )

    def token_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def render(
        self,
        template: str,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
    ) -> str:
        return _compiled(template).render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            tools=None,
            documents=None,
            **self.named,
        )

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)


class TransformersTokenizer:
    """A transformers tokenizer behind the same interface, for the classes FastTokenizer does
    not reproduce."""

    def __init__(self, folder: Path):
        from transformers import AutoTokenizer

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as error:  # transformers raises many kinds for a broken tokenizer
            raise ModelLoadError(f"cannot load the tokenizer in {folder}: {error}") from None
        self.chat_template = self._tokenizer.chat_template
        self.eos_token_id = self._tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, token_ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def vocabulary(self) -> Container[str]:
        return self._tokenizer.get_vocab()

    def special_tokens(self) -> frozenset[str]:
        added = self._tokenizer.added_tokens_decoder.values()
        return frozenset(self._tokenizer.all_special_tokens) | {
            token.content for token in added if token.special
        }

    def token_id(self, token: str) -> int | None:
        # transformers answers the unknown token's id for a string it does not know.
        found = self._tokenizer.convert_tokens_to_ids(token)
        unknown = found == self._tokenizer.unk_token_id and token != self._tokenizer.unk_token
        return None if unknown else found

    def render(
        self,
        template: str,
        messages: Sequence[Mapping[str, str]],
        add_generation_prompt: bool = True,
    ) -> str:
        return self._tokenizer.apply_chat_template(
            [dict(m) for m in messages],
            chat_template=template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    def __len__(self) -> int:
        return len(self._tokenizer)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"cannot read {path}: {error}") from None


def _content(token: str | Mapping[str, Any]) -> str:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    return token if isinstance(token, str) else token["content"]


def _chat_template(folder: Path, config: dict[str, Any]) -> str | dict[str, str] | None:
    jinja = folder / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):  # several named templates
        return {entry["name"]: entry["template"] for entry in template}
    return template


_CLEANUPS = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'")]
_CLEANUPS += [(" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


def _clean_up_spaces(text: str) -> str:
    """The old word-piece detokenisation fix-ups some configs still ask for."""
    for before, after in _CLEANUPS:
        text = text.replace(before, after)
    return text


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> Any:
    return _environment().from_string(template)


def _environment() -> Any:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """`{% generation %}…{% endgeneration %}` marks the assistant's part for training
        masks; for inference it renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            line = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(line)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(
            value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
            sort_keys=sort_keys,
        )  # fmt: skip

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationBlock, jinja2.ext.loopcontrols],
    )
    environment.filters["tojson"] = tojson
    environment.globals["raise_exception"] = raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return environment
