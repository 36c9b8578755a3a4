"""Our tokenizer front (tokenizers + Jinja, no transformers) against transformers' own."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llamachat.engine.tokenizer import FastTokenizer, TransformersTokenizer, load_tokenizer
from tests.tiny import make_tokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "  leading spaces, trailing spaces  \n\n and\ttabs",
    "天气很好，我们去公园散步吧。你好世界！",
    "emoji 🙂🚀 and accents: Ünïcödé çafé naïve",
    "special tokens inline: <|im_start|>user\nhi<|im_end|>\n",
    "def main():\n    print('hello')\n    return 0\n",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [
        {"role": "system", "content": "Be brief. 简短回答。"},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Bye"},
    ],
]
# A template using what Hugging Face's template environment offers beyond plain Jinja.
FEATURES_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{% continue %}{% endif %}"
    "{% generation %}{{ message | tojson }}{% endgeneration %}\n"
    "{% endfor %}{% if add_generation_prompt %}{{ bos_token }}go{% endif %}"
)


def assert_same(ours, reference):
    for text in TEXTS:
        ids = reference(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text) == ids
        assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)
    for messages in CONVERSATIONS:
        for template in (reference.chat_template, FEATURES_TEMPLATE):
            expected = reference.apply_chat_template(
                messages, chat_template=template, tokenize=False, add_generation_prompt=True
            )
            assert ours.render(template, messages) == expected
    assert ours.eos_token_id == reference.eos_token_id
    assert len(ours) == len(reference)
    assert set(reference.all_special_tokens) <= ours.special_tokens()


def test_the_tiny_tokenizer_matches_transformers(tmp_path):
    reference = make_tokenizer(tmp_path)
    ours = load_tokenizer(tmp_path)
    assert isinstance(ours, FastTokenizer)
    assert_same(ours, reference)


@pytest.mark.smollm2
def test_smollm2s_tokenizer_matches_transformers(smollm2_dir):
    from transformers import AutoTokenizer

    ours = load_tokenizer(smollm2_dir)
    assert isinstance(ours, FastTokenizer)
    assert_same(ours, AutoTokenizer.from_pretrained(smollm2_dir))


def test_a_tokenizer_class_with_its_own_pipeline_goes_through_transformers(tmp_path):
    make_tokenizer(tmp_path)
    config_file = tmp_path / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "GPT2Tokenizer"  # transformers may rebuild its pre-tokenizer
    fast = load_tokenizer(tmp_path)
    config_file.write_text(json.dumps(config))
    slow = load_tokenizer(tmp_path)
    assert isinstance(fast, FastTokenizer) and isinstance(slow, TransformersTokenizer)
    for text in TEXTS:
        assert slow.encode(text) == fast.encode(text)
    assert slow.token_id("<|im_end|>") == fast.token_id("<|im_end|>") is not None
    assert slow.token_id("no such token") is None and fast.token_id("no such token") is None
    assert slow.special_tokens() >= {"<|im_start|>", "<|im_end|>"}


def test_a_template_error_names_its_message(tmp_path):
    make_tokenizer(tmp_path)
    template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(Exception, match="roles must alternate"):
        load_tokenizer(tmp_path).render(template, CONVERSATIONS[0])


def test_loading_a_model_with_a_plain_tokenizer_never_imports_transformers(tiny_model_factory):
    folder, _ = tiny_model_factory()
    code = (
        "import sys; from llamachat.engine import ChatModel; "
        f"model = ChatModel.load({str(folder)!r}, device='cpu'); "
        "print(model.prompt_ids([{'role': 'user', 'content': 'Hi'}])); "
        "print('transformers' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == "False"
