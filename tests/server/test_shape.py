"""`llamachat serve --shape`: random weights of an engine shape, served under the shape's name
with an installed model's tokenizer. The tests serve the toy shape: the smallest real one (1b)
takes 45 s and 5 GB to make on the 2 cores of CI, before its first token."""

from __future__ import annotations

import pytest

from tests.conftest import run_cli
from tests.tiny import make_tokenizer

from .conftest import start_server

HI = [{"role": "user", "content": "Hello there"}]


@pytest.fixture(scope="module")
def server(tiny_home):
    # No --tokenizer: the default model's (the tiny one, the only one installed).
    served = start_server(tiny_home, "--shape", "toy", "--ctx", "512", "--max-batch", "4")
    yield served
    assert served.stop() == 0


def test_a_shape_is_served_under_its_name(server):
    client = server.client()
    (card,) = client.models.list().data
    assert card.id == "toy"
    assert card.model_extra["context_length"] == 2048  # the toy shape's
    assert card.model_extra["max_model_len"] == 512
    assert any("random weights" in line for line in server.log)


def test_chat_and_completions_with_random_weights_run_to_their_limit(server):
    client = server.client()
    reply = client.chat.completions.create(model="toy", messages=HI, max_tokens=16, temperature=0)
    assert reply.choices[0].message.content and reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 16 and reply.usage.prompt_tokens > 4
    again = client.chat.completions.create(model="toy", messages=HI, max_tokens=16, temperature=0)
    assert again.choices[0].message.content == reply.choices[0].message.content
    chunks = client.completions.create(
        model="toy", prompt="Once upon a time", max_tokens=24, stream=True, temperature=0
    )
    text = "".join(chunk.choices[0].text for chunk in chunks if chunk.choices)
    plain = client.completions.create(
        model="toy", prompt="Once upon a time", max_tokens=24, temperature=0
    )
    assert text == plain.choices[0].text and plain.usage.completion_tokens == 24


def one_error_line(result) -> str:
    lines = result.stderr.decode().strip().splitlines()
    errors = [line for line in lines if line.startswith("llamachat: error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], lines
    assert "Traceback" not in result.stderr.decode()
    return errors[0]


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--shape", "toy", "-m", "tiny"], "either --model or --shape"),
        (["--tokenizer", "tiny"], "--tokenizer goes with --shape"),
        (["--shape", "9b"], "unknown shape '9b': use 8b, 7b, 70b, 1b"),
        (["--shape", "toy", "--tokenizer", "no-such-model"], "no installed model or folder"),
    ],
)
def test_bad_shape_options_are_one_line_and_exit_2(tiny_home, args, said):
    result = run_cli("serve", "--port", "0", *args, env=tiny_home, timeout=120)
    assert result.returncode == 2
    assert said in one_error_line(result)


def test_a_tokenizer_larger_than_the_shape_is_refused(tiny_home, tmp_path):
    size = len(make_tokenizer(tmp_path, vocab_size=1024))
    assert size > 448  # the toy shape's vocabulary
    result = run_cli(
        "serve", "--port", "0", "--shape", "toy", "--tokenizer", str(tmp_path), env=tiny_home
    )
    assert result.returncode == 2
    line = one_error_line(result)
    assert f"has {size} tokens, more than the 448 of the toy shape" in line
