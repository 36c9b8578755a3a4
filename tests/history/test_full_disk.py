"""A full disk: the answer still streams to the user in full, and the history says once that it
could not save it; a history that cannot even be opened says the disk is full.

The disk is real: a 1 MiB tmpfs, mounted in a private mount namespace (`unshare --mount
--map-root-user`, util-linux, which works as root and, where user namespaces are allowed, as
anyone), filled to the last byte while the reply streams (see tests/history/full_disk.py). SQLite
meets ENOSPC there as it would on a full disk, and nothing outside the namespace sees the mount.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llamachat.engine import GREEDY, ChatModel
from llamachat.models.pull import pull
from llamachat.models.store import ModelStore
from tests.history.full_disk import MAX_TOKENS, QUESTION

TMPFS_SIZE = "1m"


@pytest.fixture(scope="module")
def models(tiny_model_factory, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("full-disk-models")
    pull(str(tiny_model_factory()[0]), ModelStore(root / "models"), root / "cache", name="tiny")
    return root / "models"


@pytest.fixture(scope="module")
def answer(models) -> str:
    """The engine's own greedy answer, as the command line should print it."""
    model = ChatModel.load(models / "tiny", device="cpu", quantization="none")
    reply = model.session().reply([{"role": "user", "content": QUESTION}], GREEDY, MAX_TOKENS)
    return "".join(reply)


def on_a_full_disk(tmp_path: Path, models: Path, scenario: str) -> dict:
    home = tmp_path / "small-disk"
    home.mkdir()
    mount = f'mount -t tmpfs -o size={TMPFS_SIZE} llamachat-test "$0" && exec "$@"'
    driver = [sys.executable, "-m", "tests.history.full_disk", str(home), str(models), scenario]
    result = subprocess.run(
        ["unshare", "--mount", "--map-root-user", "sh", "-c", mount, str(home), *driver],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_a_one_shot_answer_streams_in_full_when_the_disk_fills_mid_reply(tmp_path, models, answer):
    report = on_a_full_disk(tmp_path, models, "one-shot")
    assert report["stdout"] == answer + "\n"
    assert report["returncode"] == 0
    (line,) = report["stderr"].splitlines()
    assert line.startswith("llamachat: warning: the reply could not be saved to the history at ")
    assert line.endswith("/history.db: the disk is full")
    # The history keeps the question and what it saved before the disk filled, as interrupted.
    question, reply = report["saved"]["messages"]
    assert question["content"] == QUESTION and question["status"] == "complete"
    assert reply["status"] == "interrupted"
    assert reply["content"] and answer.startswith(reply["content"])
    assert len(reply["content"]) < len(answer)


def test_the_plain_chat_goes_on_when_the_disk_fills_mid_reply(tmp_path, models, answer):
    report = on_a_full_disk(tmp_path, models, "plain-chat")
    assert answer + "\n" in report["stdout"]
    assert report["returncode"] == 0
    lines = report["stderr"].splitlines()  # also the line that names the model, at the start
    (line,) = [line for line in lines if line.startswith("llamachat:")]
    assert line.startswith("llamachat: warning: the reply could not be saved to the history at ")
    assert line.endswith("/history.db: the disk is full")
    reply = report["saved"]["messages"][-1]
    assert reply["status"] == "interrupted" and answer.startswith(reply["content"])


def test_the_chat_app_shows_the_whole_reply_and_says_once_that_it_was_not_saved(
    tmp_path, models, answer
):
    report = on_a_full_disk(tmp_path, models, "app")
    assert report["replies"] == [answer]
    (note,) = report["notifications"]
    assert note[1] == "error"
    assert note[0].startswith("the reply could not be saved to the history at ")
    assert note[0].endswith("/history.db: the disk is full")
    # Read while the app's process (the driver) still runs: the reply is still its to finish;
    # once that process has gone, the history marks it interrupted.
    reply = report["saved"]["messages"][-1]
    assert reply["status"] == "streaming" and answer.startswith(reply["content"])
    # A message sent while the disk is still full stays in the editor, with one notice.
    assert report["editor"] == "And then?"
    ((text, severity),) = report["later"]
    assert severity == "error" and text.endswith("the disk is full")


def test_a_history_on_a_full_disk_says_the_disk_is_full(tmp_path, models):
    report = on_a_full_disk(tmp_path, models, "opening")
    for command in ("list", "ask"):
        result = report[command]
        assert result["returncode"] == 1 and result["stdout"] == ""
        (line,) = result["stderr"].splitlines()
        assert line.startswith("llamachat: error: cannot open the history at ")
        assert line.endswith("/history.db: the disk is full")


def test_a_reply_continued_on_a_full_disk_is_left_as_it_was_with_one_notice(tmp_path, models):
    report = on_a_full_disk(tmp_path, models, "app-continue")
    assert report["running"]  # the app did not fall over
    assert report["replies"] == report["cut"]
    ((text, severity),) = report["notifications"]
    assert severity == "error" and "\n" not in text
    assert text.startswith("the reply was not continued: ") and text.endswith("the disk is full")
    assert report["status"] == "cut: token limit"  # Ctrl+G can try again once there is room
    reply = report["saved"]["messages"][-1]
    assert reply["status"] == "length" and reply["content"] == report["cut"][0]
