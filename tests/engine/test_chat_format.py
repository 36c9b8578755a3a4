"""Chat formats: the model's own template first, built-in ones by name."""

from __future__ import annotations

import pytest

from llamachat.engine import BUILTIN_FORMATS, ChatModel, EngineError
from llamachat.engine.chat_format import chat_format_for, render
from llamachat.engine.tokenizer import load_tokenizer
from tests.tiny import make_tokenizer

BOS, EOS = "<|endoftext|>", "<|im_end|>"  # what make_tokenizer names them

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]


@pytest.fixture(scope="module")
def bare_tokenizer(tmp_path_factory):
    """A tokenizer without a chat template of its own."""
    folder = tmp_path_factory.mktemp("bare")
    make_tokenizer(folder, chat_template=None)
    return load_tokenizer(folder)


def test_model_template_is_used_when_present(tiny_model):
    from transformers import AutoTokenizer

    assert tiny_model.chat_format.name == "model"
    expected = AutoTokenizer.from_pretrained(tiny_model.folder).apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )
    assert render(tiny_model.tokenizer, tiny_model.chat_format, CONVERSATION) == expected


def test_llama2_format_puts_the_system_prompt_inside_the_first_instruction(bare_tokenizer):
    text = render(bare_tokenizer, BUILTIN_FORMATS["llama-2"], CONVERSATION)
    bos, eos = BOS, EOS
    first = f"{bos}[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! {eos}"
    assert text == first + f"{bos}[INST] Bye [/INST]"


def test_llama2_format_without_system_prompt(bare_tokenizer):
    text = render(bare_tokenizer, BUILTIN_FORMATS["llama-2"], CONVERSATION[1:2])
    assert text == f"{BOS}[INST] Hi [/INST]"


def test_alpaca_and_vicuna_formats(bare_tokenizer):
    alpaca = render(bare_tokenizer, BUILTIN_FORMATS["alpaca"], CONVERSATION)
    assert alpaca.endswith("### Instruction:\nBye\n\n### Response:\n")
    assert "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello!" in alpaca
    vicuna = render(bare_tokenizer, BUILTIN_FORMATS["vicuna"], CONVERSATION)
    assert vicuna.endswith(" USER: Bye ASSISTANT:")
    assert "Be brief. USER: Hi ASSISTANT: Hello!" in vicuna


def test_chatml_and_llama3_formats(bare_tokenizer):
    chatml = render(bare_tokenizer, BUILTIN_FORMATS["chatml"], CONVERSATION[:2])
    assert chatml == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    llama3 = render(bare_tokenizer, BUILTIN_FORMATS["llama-3"], CONVERSATION[1:2])
    assert llama3.endswith(
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


def test_model_without_template_gets_a_builtin_matching_its_special_tokens(bare_tokenizer):
    assert chat_format_for(bare_tokenizer).name == "chatml"  # its vocabulary has <|im_start|>


def test_named_format_overrides_the_model_template(tiny_model_factory):
    folder, _ = tiny_model_factory()
    model = ChatModel.load(folder, device="cpu", chat_format="vicuna")
    assert model.chat_format.name == "vicuna"
    assert "USER:" in model.chat_format.stop


def test_unknown_format_is_refused_with_the_choices(bare_tokenizer):
    with pytest.raises(EngineError, match="alpaca"):
        chat_format_for(bare_tokenizer, "nonsense")


def test_stop_strings_that_are_special_tokens_end_replies_as_ids(tiny_model_factory):
    folder, _ = tiny_model_factory()
    model = ChatModel.load(folder, device="cpu", chat_format="chatml")
    assert model.tokenizer.token_id("<|im_end|>") in model.eos_token_ids
