"""The leaderboard page (``mirage bench leaderboard``): its tables are the summary's worst cases and
the verdict, the checked-in page is the one the committed results give, and it renders in headless
Chromium."""

import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image, ImageStat
from test_verdict_noise import SUITE, defended, record, undefended
from typer.testing import CliRunner

from mirage.bench.config import SweepConfig, load_config
from mirage.bench.leaderboard import Source, build_leaderboard
from mirage.bench.results import ResultStore
from mirage.bench.summary import point_label, verdict, verdict_advice, worst_case_points
from mirage.cli import app

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "results" / "leaderboard.html"
WORST_CASE_RESULTS = ROOT / "results" / "worst_case" / "results.jsonl"
WINDOW = (1400, 1000)
VERDICT_GREEN = (0x22, 0xAA, 0x66)  # the report's verdict box, border #2a6

# Hand-made suite runs (scenario digits, knockoff × hard-label and soft): the undefended API's
# worst case is its soft clone, 0.90 ± 0.008 over seeds 0-2; B holds every attacker about 19
# points under it at every seed (deployed); E is lower still but costs 7 points; C ran one seed;
# D has no hard-label run yet.
RECORDS = [
    *undefended([0.90, 0.91, 0.89], [0.88, 0.89, 0.87], seeds=(0, 1, 2)),
    *defended("B", [0.60, 0.62, 0.58], [0.70, 0.72, 0.71], seeds=(0, 1, 2)),
    *defended("C", [0.50], [0.80]),
    *defended("E", [0.20] * 3, [0.30] * 3, seeds=(0, 1, 2), defender=0.85),
    record("D", "soft", 0.30),
]
RERUN = "rerun: mirage bench run --config {config} --scenario digits --attack knockoff --defense "
HAND_TABLE = [
    # defense, rank, soft clone, worst-case clone, by attacker, cost, overhead, verdict, from
    ["none", "ref", "0.9000", "0.9000", "soft ± 0.008 (3 seeds)", "0.00", "2.0000", "reference"],
    ["E", "1", "0.2000", "0.3000", "hard-label ± 0.000 (3 seeds)", "7.00", "2.0000", ""],
    ["B", "2", "0.6000", "0.7100", "hard-label ± 0.008 (3 seeds)", "0.00", "2.0000", "deploy"],
    ["C", "3", "0.5000", "0.8000", "hard-label (1 seed)", "0.00", "2.0000", ""],
    ["D", "–", "0.3000", "≥ 0.3000", "soft (1 seed)", "0.00", "2.0000", "pending: hard-label"],
]
SEEDS = {"none": "0,1,2", "E": "0,1,2", "B": "0,1,2", "C": "0", "D": "0"}


class Page(HTMLParser):
    """A page's tables (rows of cell texts, the header row first) and its whole text."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)


def suite_config(name="t"):
    return SweepConfig.model_validate(
        {
            "name": name,
            "scenarios": ["digits"],
            "defenses": [{"name": "none"}],
            "attacks": [{"name": "knockoff", "budget": 10, "variants": list(SUITE)}],
        }
    )


def results_file(tmp_path):
    path = tmp_path / "results.jsonl"
    for r in RECORDS:
        ResultStore(path).append(r)
    return path


def test_the_tables_are_the_summarys_worst_cases_and_the_verdict(tmp_path):
    path = results_file(tmp_path)
    page = Page(
        build_leaderboard(
            [Source("t.toml", suite_config(), path)], tmp_path / "lb.html"
        ).read_text()
    )
    (header, verdict_row), (head, *rows) = page.tables
    verdict_cells = dict(zip(header, verdict_row, strict=True))
    assert verdict_row[:4] == ["t", "digits", "knockoff", "B"]
    assert verdict_cells["worst-case clone"] == "0.7100" and verdict_cells["seeds"] == "0,1,2"
    assert head == [
        "defense",
        "rank",
        "soft clone",
        "worst-case clone",
        "by attacker",
        "defender cost (pts)",
        "overhead",
        "verdict",
        "from",
    ]
    assert [row[:-1] for row in rows] == HAND_TABLE
    for row in rows:
        assert row[-1] == (
            f"{path}, seeds {SEEDS[row[0]]}; " + RERUN.format(config="t.toml") + row[0]
        )
    # the same figures as the summary's worst case, point by point
    points = {
        point_label(p): p
        for p in worst_case_points(RECORDS, {"knockoff": SUITE})[("digits", "knockoff")]
    }
    assert sorted(points) == sorted(row[0] for row in rows)
    for row in rows:
        p = points[row[0]]
        assert row[3].removeprefix("≥ ") == f"{p.worst:.4f}" and row[4].startswith(p.worst_attacker)
    (expected,) = verdict({("digits", "knockoff"): list(points.values())})
    assert expected["deploy"] == "B"
    assert verdict_advice(expected).replace("`", "") in "".join(page.text)


def test_the_command_writes_the_page_and_refuses_what_it_cannot_rank(tmp_path):
    path = results_file(tmp_path)
    config = tmp_path / "t.toml"
    config.write_text(
        'name = "t"\nscenarios = ["digits"]\n[[defenses]]\nname = "none"\n'
        f'[[attacks]]\nname = "knockoff"\nbudget = 10\nvariants = {list(SUITE)!r}\n'.replace(
            "'", '"'
        )
    )
    out = tmp_path / "page" / "lb.html"
    args = ["bench", "leaderboard", "--config", str(config), "--results", str(path)]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    assert f"mirage bench leaderboard --config {config} --results {path}" in text
    assert [row[:-1] for row in Page(text).tables[1][1:]] == HAND_TABLE
    twice = CliRunner().invoke(app, [*args, "--results", str(path), "--out", str(out)])
    assert twice.exit_code == 2 and "one --results per --config" in twice.output
    empty = CliRunner().invoke(app, [*args[:-1], str(tmp_path / "none.jsonl"), "--out", str(out)])
    assert empty.exit_code == 2 and "no run of an attacker suite" in empty.output
    plain = CliRunner().invoke(app, ["bench", "leaderboard", "--config", "full", "--out", str(out)])
    assert plain.exit_code == 2 and "no attacker suite" in plain.output


def test_the_checked_in_page_is_the_one_the_committed_results_give(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the page names its results as the default command does
    out = tmp_path / "leaderboard.html"
    result = CliRunner().invoke(app, ["bench", "leaderboard", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_text() == PAGE.read_text(), (
        "results/leaderboard.html is out of date: rebuild it with `mirage bench leaderboard`"
    )
    # self-contained: no script, stylesheet, image or frame to fetch, no address
    assert not re.search(r"<(script|link|img|iframe)\b|\bsrc=|://", PAGE.read_text())


def chromium_binary() -> str:
    """The chromium binary. scripts/bootstrap.sh installs it for the test command, so with
    MIRAGE_REQUIRE_CHROMIUM=1 (set by .ci/run) its absence fails the test instead of skipping
    it."""
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("MIRAGE_REQUIRE_CHROMIUM") == "1":
            pytest.fail("chromium is missing but MIRAGE_REQUIRE_CHROMIUM=1 (run scripts/test.sh)")
        pytest.skip("chromium is not installed (scripts/test.sh installs it)")
    return path


def test_a_missing_chromium_fails_where_it_is_required(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setenv("MIRAGE_REQUIRE_CHROMIUM", "1")  # as .ci/run sets it
    with pytest.raises(pytest.fail.Exception, match="MIRAGE_REQUIRE_CHROMIUM"):
        chromium_binary()
    monkeypatch.delenv("MIRAGE_REQUIRE_CHROMIUM")
    with pytest.raises(pytest.skip.Exception):
        chromium_binary()


def headless(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium (its new headless mode) on the checked-in page, with a profile of its
    own."""
    command = [
        chromium_binary(),
        "--headless",
        "--no-sandbox",  # root in containers
        "--disable-gpu",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        *args,
        PAGE.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


@pytest.mark.slow
def test_the_checked_in_page_renders_in_headless_chromium(tmp_path):
    shot = tmp_path / "leaderboard.png"
    headless(tmp_path, f"--screenshot={shot}")
    with Image.open(shot) as image:
        assert image.format == "PNG" and image.size == WINDOW
        pixels = image.convert("RGB")
    grey = pixels.convert("L")
    assert ImageStat.Stat(grey).stddev[0] > 20  # not a blank page
    colours = {colour: count for count, colour in pixels.getcolors(WINDOW[0] * WINDOW[1])}
    assert colours.get(VERDICT_GREEN, 0) > 2 * WINDOW[0]  # the verdict box, with its stylesheet
    assert sum(count for count, value in grey.getcolors() if value < 80) > 5000  # text

    dom = Page(headless(tmp_path, "--dump-dom").stdout)
    config = load_config("worst_case")
    panels = worst_case_points(ResultStore(WORST_CASE_RESULTS).read(), config.suites)
    rows = verdict(panels)
    verdict_table, *tables = dom.tables
    assert [row[1:4] for row in verdict_table[1:]] == [
        [r["scenario"], r["attack"], r["deploy"]] for r in rows
    ]
    assert [len(table) - 1 for table in tables] == [
        len(panels[(r["scenario"], r["attack"])]) for r in rows
    ]
    text = "".join(dom.text)
    assert all(verdict_advice(r).replace("`", "") in text for r in rows)
