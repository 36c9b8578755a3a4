"""StreamDecoder on a byte-level vocabulary: every token is one byte of UTF-8."""

from __future__ import annotations

from llamachat.engine.detokenize import StreamDecoder


def byte_decode(ids: list[int]) -> str:
    return bytes(ids).decode("utf-8", errors="replace")


def stream(text: str, stops=()) -> tuple[list[str], StreamDecoder]:
    decoder = StreamDecoder(byte_decode, stops)
    pieces = [decoder.push(b) for b in text.encode("utf-8")]
    pieces.append(decoder.finish())
    return [p for p in pieces if p], decoder


def test_multibyte_characters_are_never_split():
    text = "长城很长 🚀 naïve ĀĀ"
    pieces, decoder = stream(text)
    assert "".join(pieces) == text == decoder.text
    assert all("\ufffd" not in piece for piece in pieces)
    assert "长" in pieces and "🚀" in pieces[pieces.index(" ") + 1 :]


def test_stop_string_split_across_tokens_is_held_back_and_dropped():
    pieces, decoder = stream("The answer is 42.\nUSER: next question", stops=["USER:"])
    assert "".join(pieces) == "The answer is 42.\n"
    assert decoder.stopped
    assert not any("U" in piece for piece in pieces)


def test_held_back_text_is_released_when_it_stops_matching():
    pieces, _ = stream("US is not USA", stops=["USER:"])
    assert "".join(pieces) == "US is not USA"


def test_text_after_a_stop_string_is_ignored():
    decoder = StreamDecoder(byte_decode, ["END"])
    out = "".join(decoder.push(b) for b in b"abcEND")
    assert decoder.push(ord("x")) == "" and decoder.finish() == ""
    assert out == decoder.text == "abc"


def test_a_reply_cut_off_inside_a_character_ends_before_it():
    # As llama.cpp's server and vLLM do: the bytes of a character the reply never finished
    # (its token budget ran out, or it was stopped) are not shown as U+FFFD.
    decoder = StreamDecoder(byte_decode)
    pieces = [decoder.push(b) for b in "长城很".encode() + "长".encode()[:2]]
    assert "".join(pieces) + decoder.finish() == "长城很" == decoder.text


def test_a_finished_replacement_character_is_kept():
    # U+FFFD that the reply spelled out whole (EF BF BD), then more text, is text like any other.
    pieces, decoder = stream("a\ufffdb")
    assert "".join(pieces) == "a\ufffdb" == decoder.text


def test_earliest_of_several_stop_strings_wins():
    pieces, _ = stream("one ### two USER: three", stops=["USER:", "###"])
    assert "".join(pieces) == "one "
