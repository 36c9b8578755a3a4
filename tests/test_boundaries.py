"""Which part of llamachat may import which: checked for every module, by reading the imports
of each file (also those inside functions) and by importing each module in a fresh interpreter
(what it pulls in transitively)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import llamachat

PACKAGE = Path(llamachat.__file__).parent
UI_AND_HTTP = ("textual", "typer", "rich", "click", "httpx", "fastapi", "starlette", "uvicorn")


def modules(folder: str) -> list[str]:
    """Every module of llamachat/FOLDER, by dotted name."""
    root = PACKAGE / folder
    names = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def imported_by(module: str) -> set[str]:
    """The absolute names of what the module's source imports, wherever in it."""
    path = PACKAGE.parent / Path(*module.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def loaded_after_import(module: str) -> list[str]:
    """The top-level packages (and llamachat's own modules) a fresh interpreter holds after
    importing `module`."""
    code = (
        f"import sys, json, {module}\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} | "
        "{m for m in sys.modules if m.startswith('llamachat.')})))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout)


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


# The stores and the plain modules every front end shares load no torch.
TORCH_FREE = [
    *modules("models"),
    *modules("history"),
    *modules("backends"),
    "llamachat.chat_options",
    "llamachat.settings",
    "llamachat.home",
    "llamachat.kv_files",
    "llamachat.private",
    "llamachat.processes",
    "llamachat.remotes",
]


@pytest.mark.parametrize("module", TORCH_FREE)
def test_stores_and_shared_modules_load_no_torch(module):
    assert "torch" not in loaded_after_import(module)


@pytest.mark.parametrize("module", modules("server"))
def test_the_server_loads_no_torch_and_no_engine_cli_or_app(module):
    loaded = loaded_after_import(module)
    assert "torch" not in loaded
    reached = [
        name
        for name in loaded
        if any(_within(name, p) for p in ("llamachat.engine", "llamachat.cli", "llamachat.tui"))
    ]
    assert not reached, f"{module} loads {reached}"


ENGINE = modules("engine")


@pytest.mark.parametrize("module", ENGINE)
def test_the_engine_imports_no_ui_or_http_library(module):
    named = {name for name in imported_by(module) if name.split(".")[0] in UI_AND_HTTP}
    assert not named, f"{module} imports {sorted(named)}"


@pytest.mark.parametrize("module", modules("tui"))
def test_the_app_imports_neither_the_cli_nor_the_engine(module):
    named = {
        name
        for name in imported_by(module)
        if _within(name, "llamachat.cli") or _within(name, "llamachat.engine")
    }
    assert not named, f"{module} imports {sorted(named)}"


# Commands that work on models as files or measure the engine itself, not through a chat:
# `pull`/`show` read config.json with the engine's parser, `bench` times the engine, and the
# entry point maps the engine's errors to exit codes.
ENGINE_TOOLS = {"llamachat.cli.app", "llamachat.cli.bench", "llamachat.cli.models"}


@pytest.mark.parametrize("module", modules("cli"))
def test_the_cli_reaches_the_engine_only_through_a_backend(module):
    named = {name for name in imported_by(module) if _within(name, "llamachat.engine")}
    assert module in ENGINE_TOOLS or not named, f"{module} imports {sorted(named)}"


@pytest.mark.parametrize("module", modules("cli"))
def test_the_cli_reaches_the_app_through_its_one_entry_point(module):
    named = {name for name in imported_by(module) if _within(name, "llamachat.tui")}
    allowed = {"llamachat.tui", "llamachat.tui.run"} if module == "llamachat.cli.app" else set()
    assert named <= allowed, f"{module} imports {sorted(named - allowed)}"


def test_the_cli_imports_the_app_only_when_it_starts_it():
    tree = ast.parse((PACKAGE / "cli" / "app.py").read_text(encoding="utf-8"))
    where = [
        function.name
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef)
        for node in ast.walk(function)
        if isinstance(node, ast.ImportFrom) and node.module == "tui"
    ]
    assert where == ["open_chat_app"]
    assert "llamachat.tui" not in loaded_after_import("llamachat.cli.app")


def test_front_ends_load_the_engine_only_once_a_local_chat_opens(tiny_model_factory, tmp_path):
    from llamachat.models.pull import pull
    from llamachat.models.store import ModelStore

    pull(str(tiny_model_factory()[0]), ModelStore(tmp_path / "models"), tmp_path, name="tiny")
    code = (
        "import sys\n"
        "import llamachat.cli.answer, llamachat.cli.chat, llamachat.tui.app\n"
        "from llamachat.backends.base import ChatSpec\n"
        "from llamachat.backends.local import LocalBackend\n"
        "from pathlib import Path\nfrom llamachat.models.store import ModelStore\n"
        "before = sorted(m for m in sys.modules if m.startswith('llamachat.engine'))\n"
        f"store = ModelStore(Path({str(tmp_path / 'models')!r}))\n"
        "backend = LocalBackend(store)\n"
        "names = [m.name for m in backend.models()]\n"
        "between = 'llamachat.engine' in sys.modules or 'torch' in sys.modules\n"
        "chat = backend.open_chat(ChatSpec(model=names[0], ctx=64, device='cpu'))\n"
        "print(before, between, 'llamachat.engine' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["[]", "False", "True"]
