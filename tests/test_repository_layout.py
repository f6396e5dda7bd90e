"""What lives where: ``benchmarks/`` holds the performance benchmarks on the shared harness
(every script imports ``_harness``) and nothing else but the harness and a README naming each;
``experiments/`` holds one folder per question, whose README names the command that runs each of
its sweep configs and scripts. No shell drivers in either: a sweep config lists its runs, and a
README names the commands."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _files(folder: Path) -> list[Path]:
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.relative_to(folder).parts
    )


def _imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def benchmark_problems(root: Path) -> list[str]:
    folder = root / "benchmarks"
    readme = folder / "README.md"
    listed = readme.read_text() if readme.is_file() else ""
    problems = [] if readme.is_file() else ["benchmarks/README.md is missing"]
    for path in _files(folder):
        name = path.relative_to(root).as_posix()
        if path.parent != folder:
            problems.append(f"{name}: benchmarks/ has no subfolders")
        elif path.name in ("README.md", "_harness.py"):
            continue
        elif path.suffix != ".py":
            problems.append(f"{name}: not a benchmark script (a shell driver, a config or data)")
        elif "_harness" not in _imported(path):
            problems.append(
                f"{name}: does not import _harness, so it is no benchmark on the harness "
                "(an experiment goes to experiments/<question>/)"
            )
        elif name not in listed:
            problems.append(f"{name}: benchmarks/README.md does not name it")
    return problems


def experiment_problems(root: Path) -> list[str]:
    folder = root / "experiments"
    problems = [
        f"{path.relative_to(root).as_posix()}: "
        + ("a shell driver" if path.suffix == ".sh" else "experiments/ holds folders only")
        for path in _files(folder)
        if path.suffix == ".sh" or path.parent == folder
    ]
    for question in sorted(p for p in folder.iterdir() if p.is_dir() and p.name != "__pycache__"):
        readme = question / "README.md"
        if not readme.is_file():
            problems.append(f"{question.relative_to(root).as_posix()}: no README.md")
            continue
        text = readme.read_text()
        runnable = sorted(
            p for p in question.iterdir() if p.suffix in (".toml", ".py") and p.name[0] != "_"
        )
        if not runnable:
            problems.append(f"{question.relative_to(root).as_posix()}: no config or script")
        for path in runnable:
            name = path.relative_to(root).as_posix()
            command = (
                f"mirage bench run --config {name}" if path.suffix == ".toml" else f"python {name}"
            )
            if command not in text:
                problems.append(f"{readme.relative_to(root).as_posix()} names no `{command} …`")
    return problems


def test_benchmarks_holds_the_performance_benchmarks_only():
    assert not benchmark_problems(ROOT)


def test_every_experiment_names_its_commands():
    assert not experiment_problems(ROOT)


def test_the_checks_catch_strays(tmp_path):
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "_harness.py").write_text("")
    (tmp_path / "benchmarks" / "README.md").write_text("benchmarks/timed.py\n")
    (tmp_path / "benchmarks" / "timed.py").write_text("from _harness import parser\n")
    (tmp_path / "benchmarks" / "unlisted.py").write_text("import _harness\n")
    (tmp_path / "benchmarks" / "study.py").write_text("import torch\n")
    (tmp_path / "benchmarks" / "run_all.sh").write_text("")
    assert [p.split(":")[0] for p in benchmark_problems(tmp_path)] == [
        "benchmarks/run_all.sh",
        "benchmarks/study.py",
        "benchmarks/unlisted.py",
    ]
    for name in ("documented", "silent", "bare"):
        (tmp_path / "experiments" / name).mkdir(parents=True)
    (tmp_path / "experiments" / "documented" / "config.toml").write_text("")
    (tmp_path / "experiments" / "documented" / "README.md").write_text(
        "    mirage bench run --config experiments/documented/config.toml --results r.jsonl\n"
    )
    (tmp_path / "experiments" / "silent" / "probe.py").write_text("")
    (tmp_path / "experiments" / "silent" / "README.md").write_text("A question.\n")
    (tmp_path / "experiments" / "bare" / "config.toml").write_text("")
    (tmp_path / "experiments" / "run.sh").write_text("")
    assert experiment_problems(tmp_path) == [
        "experiments/run.sh: a shell driver",
        "experiments/bare: no README.md",
        "experiments/silent/README.md names no `python experiments/silent/probe.py …`",
    ]
