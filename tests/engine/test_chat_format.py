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


LLAMA3_TOKENS = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
STOPPED = [*CONVERSATION[:3], {"role": "user", "content": "Tell me more"}]
# A reply cut short (Esc, the token limit): what a Continue goes on from.
HALF_REPLY = {"role": "assistant", "content": "The fox jumps over"}


@pytest.fixture(scope="module")
def llama3_tokenizer(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama3")
    make_tokenizer(folder, chat_template=None, extra_special_tokens=LLAMA3_TOKENS)
    return load_tokenizer(folder)


@pytest.mark.parametrize(
    ("name", "closing"), [("chatml", "<|im_end|>\n"), ("llama-3", "<|eot_id|>")]
)
def test_a_continued_reply_is_the_whole_conversation_less_the_end_of_its_turn(
    name, closing, bare_tokenizer, llama3_tokenizer
):
    tokenizer = llama3_tokenizer if name == "llama-3" else bare_tokenizer
    chat_format = BUILTIN_FORMATS[name]
    messages = [*STOPPED, HALF_REPLY]
    whole = tokenizer.render(chat_format.template, messages, add_generation_prompt=False)
    continued = render(tokenizer, chat_format, messages, continue_reply=True)
    assert continued.endswith("The fox jumps over") and continued + closing == whole
    whole_ids, continued_ids = tokenizer.encode(whole), tokenizer.encode(continued)
    assert whole_ids[: len(continued_ids)] == continued_ids
    # What is left is the end of the turn alone, its special token first.
    left = whole_ids[len(continued_ids) :]
    assert left == tokenizer.encode(closing)
    assert left[0] == tokenizer.token_id(closing.strip())


def test_a_continued_reply_matches_transformers_continue_final_message(tiny_model):
    from transformers import AutoTokenizer

    messages = [*STOPPED, {"role": "assistant", "content": "The fox jumps over "}]
    expected = AutoTokenizer.from_pretrained(tiny_model.folder).apply_chat_template(
        messages, tokenize=False, continue_final_message=True
    )
    assert render(tiny_model.tokenizer, tiny_model.chat_format, messages, True) == expected
    assert tiny_model.prompt_ids(messages, continue_reply=True) == tiny_model.encode(expected)


def test_continuing_an_empty_reply_is_a_new_reply(bare_tokenizer):
    chatml = BUILTIN_FORMATS["chatml"]
    empty = [*STOPPED, {"role": "assistant", "content": ""}]
    assert render(bare_tokenizer, chatml, empty, continue_reply=True) == render(
        bare_tokenizer, chatml, STOPPED
    )


def test_only_an_assistants_last_message_continues(bare_tokenizer):
    with pytest.raises(EngineError, match="assistant"):
        render(bare_tokenizer, BUILTIN_FORMATS["chatml"], STOPPED, continue_reply=True)
