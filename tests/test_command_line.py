"""The command line as an operator meets it: a config file's problems in one line each."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from mirage.cli import app

KEY = "0" * 64
SERVE = f"""[model]
name = "digits"
scenario = "digits"

[limits]
max_batch = 64

[[clients]]
name = "alice"
key_sha256 = "{KEY}"
"""


def one_line_error(args: list[str]) -> str:
    """The output of a command that must fail on its config: exit code 2, one line, no traceback."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit | None)
    [line] = result.output.strip().splitlines()
    return line


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (
            "syntax.toml",
            SERVE.replace('name = "digits"', "name = "),
            "syntax.toml: line 2, column 8: invalid value",
        ),
        (
            "typo.toml",
            SERVE.replace("max_batch", "max_btach"),
            "typo.toml: limits.max_btach: unknown key (did you mean max_batch?)",
        ),
        (
            "scenario.toml",
            SERVE.replace('scenario = "digits"', 'scenario = "digitz"'),
            (
                "scenario.toml: model.scenario: unknown scenario 'digitz'; "
                "known: cifar10, digits, fmnist, fmnist-id, mnist"
            ),
        ),
        (
            "broken.json",
            '{"model": {',
            "broken.json: line 1, column 12: expecting property name enclosed in double quotes",
        ),
    ],
)
def test_a_bad_serve_config_is_one_line_and_exit_code_2(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    assert one_line_error(["serve", "--config", str(path)]) == f"error: {tmp_path}/{expected}"


def test_a_missing_serve_config_is_one_line_and_exit_code_2(tmp_path):
    missing = tmp_path / "nowhere.toml"
    assert one_line_error(["serve", "--config", str(missing)]) == f"error: {missing}: no such file"
    assert (
        one_line_error(["serve", "--config", str(tmp_path)])
        == f"error: {tmp_path}: a directory, not a config file"
    )


def test_a_bad_sweep_config_is_one_line_and_exit_code_2(tmp_path):
    typo = tmp_path / "typo.toml"
    typo.write_text(
        'name = "x"\nscenarios = ["digits"]\nseeds = [0]\n[[attacks]]\nname = "knockoff"\n'
        'budgets = 10\n[[defenses]]\nname = "none"\n'
    )
    lines = (
        CliRunner().invoke(app, ["bench", "run", "--config", str(typo)]).output.strip().splitlines()
    )
    assert lines == [
        f"error: {typo}: attacks[0].budget: missing (required)",
        f"error: {typo}: attacks[0].budgets: unknown key (did you mean budget?)",
    ]
    syntax = tmp_path / "syntax.toml"
    syntax.write_text('name = "x"\nseeds = [0,,1]\n')
    assert one_line_error(["bench", "run", "--config", str(syntax)]).startswith(
        f"error: {syntax}: line 2, column "
    )
    assert one_line_error(["bench", "run", "--config", "no-such-profile"]) == (
        "error: no-such-profile: no sweep config 'no-such-profile' (built-in profiles: "
        "['cifar10', 'full', 'quick', 'worst_case'])"
    )
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(
        typo.read_text().replace("budgets", "budget").replace('"digits"', '"digitz"')
    )
    assert one_line_error(["bench", "status", "--config", str(scenario)]).startswith(
        f"error: {scenario}: unknown scenarios ['digitz']"
    )


def _command_paths() -> list[list[str]]:
    """Every command and command group below ``mirage``, as its argument path."""
    found = []

    def walk(command, path: list[str]) -> None:
        for name, sub in getattr(command, "commands", {}).items():
            found.append([*path, name])
            walk(sub, [*path, name])

    walk(get_command(app), [])
    return found


@pytest.mark.parametrize("path", _command_paths(), ids=" ".join)
def test_every_commands_help_shows_an_example(path):
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output, result.output


def test_bench_help_lists_every_builtin_profile():
    from mirage.bench.config import PROFILES_DIR
    from mirage.cli.bench import PROFILES_DIR as FOUND

    assert FOUND == PROFILES_DIR
    profiles = sorted(path.stem for path in PROFILES_DIR.glob("*.toml"))
    assert "worst_case" in profiles
    for args in (["bench", "--help"], ["bench", "run", "--help"]):
        output = CliRunner().invoke(app, args).output
        assert all(name in output for name in profiles), output


def test_verify_help_keeps_its_square_brackets():
    output = CliRunner().invoke(app, ["verify", "--help"]).output
    assert output.count("[ownership]") >= 2, output


def test_mirage_defenses_says_required_and_imports_no_scipy_stats(monkeypatch):
    from mirage.cli.app import console

    monkeypatch.setattr(console, "width", 400)  # whole cells: no parameter folded over lines
    output = CliRunner().invoke(app, ["defenses"]).output
    assert "PydanticUndefined" not in output
    assert "oe_model=required, misinformation_model=required" in output and "epsilon=0.5" in output
    # what the listing needs is the registry: scipy.stats (0.6 s) only loads for a stream alarm
    code = (
        "import sys; from mirage.cli import app; "
        "app(['defenses'], prog_name='mirage', standalone_mode=False); "
        "sys.exit('scipy.stats' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
