"""Theme files: a bad value in one is reported and the file skipped, never a crash of the app."""

from __future__ import annotations

import pytest

from llamachat.tui.themes import DEFAULT_THEME, load_themes
from tests.tui.conftest import app_for, settle, write_config

# Each line: a value that Textual cannot use, as a user might write it in a theme file.
BAD_VALUES = {
    "primary": 'primary = "notacolor"',
    "secondary": 'primary = "#123456"\nsecondary = "notacolor"',
    "dark": 'primary = "#123456"\ndark = "yes"',
    "variables": 'primary = "#123456"\nvariables = "notatable"',
    "variables-value": 'primary = "#123456"\nvariables = { "footer-key-foreground" = 3 }',
    "luminosity_spread": 'primary = "#123456"\nluminosity_spread = "x"',
    "text_alpha": 'primary = "#123456"\ntext_alpha = true',
    "primary-missing": 'background = "#000000"',
    "primary-type": "primary = 12",
}


def write_theme(folder, text: str, name: str = "bad") -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.toml").write_text(f'name = "{name}"\n{text}\n')


@pytest.mark.parametrize("case", BAD_VALUES)
def test_a_bad_value_skips_the_theme_and_says_which_field(tmp_path, case):
    write_theme(tmp_path, BAD_VALUES[case])
    write_theme(tmp_path, 'primary = "#123456"\ndark = false', name="good")
    themes, problems = load_themes([tmp_path])
    assert [theme.name for theme in themes] == ["good"]
    (problem,) = problems
    assert problem.path.name == "bad.toml"
    field = case.split("-")[0]
    assert field in problem.reason, problem.reason


def test_a_name_that_is_not_text_is_a_problem_not_a_crash(tmp_path):
    (tmp_path / "odd.toml").write_text('name = 7\nprimary = "#123456"\n')
    themes, problems = load_themes([tmp_path])
    assert themes == [] and "name" in problems[0].reason


@pytest.mark.parametrize("case", ["primary", "dark", "variables", "luminosity_spread"])
async def test_a_saved_bad_theme_falls_back_to_the_default_with_a_notice(home, case):
    write_theme(home.themes, BAD_VALUES[case])
    write_config(home, theme="bad")
    app = app_for(home)
    async with app.run_test() as pilot:
        await settle(pilot, app)
        assert app.theme == DEFAULT_THEME
        notices = [str(n.message) for n in app._notifications]
        assert any("bad.toml" in notice and case in notice for notice in notices), notices
        assert any("'bad'" in notice and DEFAULT_THEME in notice for notice in notices), notices
        assert app.chat is not None  # the app carries on: the model loaded


@pytest.mark.parametrize(
    "variable",
    ['"footer-key-foreground" = "notacolor"', '"block-cursor-text-style" = "sideways"'],
)
async def test_a_variable_the_apps_css_rejects_skips_the_theme(home, variable):
    write_theme(home.themes, f'primary = "#123456"\nvariables = {{ {variable} }}')
    app = app_for(home, theme="bad")
    async with app.run_test() as pilot:
        await settle(pilot, app)
        assert app.theme == DEFAULT_THEME and "bad" not in app.available_themes
        name = variable.split('"')[1]
        notices = [str(n.message) for n in app._notifications]
        assert any("bad.toml" in notice and name in notice for notice in notices), notices


async def test_a_theme_with_good_variables_is_used(home):
    variables = '"footer-key-foreground" = "#ff0000", "block-cursor-text-style" = "bold"'
    write_theme(home.themes, f'primary = "#123456"\nvariables = {{ {variables} }}', name="fine")
    app = app_for(home, theme="fine")
    async with app.run_test() as pilot:
        await settle(pilot, app)
        assert app.theme == "fine"
        assert app.theme_variables["footer-key-foreground"] == "#ff0000"
        assert not [n for n in app._notifications if "theme" in str(n.message)]
