"""F5 / the palette's export: where the file goes (said in full), never over an earlier one."""

from __future__ import annotations

import stat

from llamachat.history.store import HistoryStore
from tests.tui.conftest import app_for, settle, write_config


def exported(app) -> list[str]:
    return [str(n.message) for n in app._notifications if "exported" in str(n.message)]


async def test_a_second_export_does_not_overwrite_the_first(home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    history = HistoryStore(home.history_db)
    conversation = history.create(model="tiny")
    history.add_message(conversation, "user", "Export me")
    app = app_for(home, continue_latest=True)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await pilot.press("f5")
        history.add_message(conversation, "user", "And me")
        await pilot.press("f5")
        await pilot.pause()
        first = tmp_path / f"llamachat-{conversation}.md"
        second = tmp_path / f"llamachat-{conversation}-2.md"
        assert "And me" not in first.read_text() and "And me" in second.read_text()
        assert exported(app) == [f"exported to {first}", f"exported to {second}"]
        assert stat.S_IMODE(first.stat().st_mode) == 0o600  # a conversation is private


async def test_exports_go_to_the_configured_folder(home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "exports" / "chats"  # not there yet
    write_config(home, export_dir=str(folder))
    history = HistoryStore(home.history_db)
    conversation = history.create(model="tiny")
    history.add_message(conversation, "user", "Export me")
    app = app_for(home, continue_latest=True)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        app.action_export("json")
        await pilot.pause()
        path = folder / f"llamachat-{conversation}.json"
        assert '"Export me"' in path.read_text()
        assert exported(app) == [f"exported to {path}"]
        assert not list(tmp_path.glob("llamachat-*"))


async def test_a_folder_that_cannot_be_written_is_one_line_not_a_crash(home, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    write_config(home, export_dir=str(blocker / "exports"))
    history = HistoryStore(home.history_db)
    conversation = history.create(model="tiny")
    history.add_message(conversation, "user", "Export me")
    app = app_for(home, continue_latest=True)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        await pilot.press("f5")
        await pilot.pause()
        assert app.is_running
        (notice,) = [str(n.message) for n in app._notifications if "export" in str(n.message)]
        assert "cannot export" in notice and str(blocker) in notice and "\n" not in notice
