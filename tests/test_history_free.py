"""The repository speaks of the product only: no tracked file is named, and no line of a tracked
text file reads, like a development-history label ("session 13", "session13_…", "Issue 17",
"issue #12", "issues 16, 18"). A file, a section or a setting is named by what it holds or does.

Words without a number ("sessions", "session_id", an HTTP client's "issue") are not labels."""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# "session" or "issue" (optionally plural), then any spaces, underscores, "#" or "-", then digits;
# not inside a longer word ("reissue 3"), but after "_" or "/" as in a file name.
LABEL = re.compile(r"(?<![A-Za-z])(?:session|issue)s?[ _#-]*[0-9]+", re.IGNORECASE)

# Files left out whole, each with why; the test itself states the labels it forbids.
EXEMPT = {
    Path(__file__).relative_to(ROOT).as_posix(): "states the labels it forbids",
}
# Single lines left as they are, by file and a snippet of the line: each is someone else's to
# rewrite; any other label in the same file still fails.
EXEMPT_LINES: dict[str, tuple[str, ...]] = {}


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs git and the repository's .git to list the tracked files")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
    if listed.returncode != 0:
        pytest.skip(f"git ls-files failed: {listed.stderr.decode(errors='replace').strip()}")
    return [name for name in listed.stdout.decode().split("\0") if name]


def labelled_lines(text: str) -> list[tuple[int, str]]:
    return [
        (number, line.strip())
        for number, line in enumerate(text.splitlines(), 1)
        if LABEL.search(line)
    ]


@pytest.mark.parametrize(
    "text, labels",
    [
        ("Session 13: answer buckets", 1),
        ("results/ownership/session13_tie_dropper.jsonl", 1),
        ("benchmarks/run_worst_case_session9.sh", 1),
        ("(issue 31)", 1),
        ("issue #12 and Issue-4", 1),
        ("the issues 16, 18 goal", 1),
        ("sessions of a client, session_id, an HTTP session", 0),
        ("clients issue requests; a reissue 3 times", 0),
        ("the layer session#i of alice/session", 0),
    ],
)
def test_the_pattern_tells_labels_from_words(text, labels):
    assert len(labelled_lines(text)) == labels


@pytest.mark.slow
def test_no_tracked_file_carries_a_history_label():
    found = []
    for name in tracked_files():
        if name in EXEMPT:
            continue
        if LABEL.search(name):
            found.append(f"{name}: the file name")
        path = ROOT / name
        if not path.is_file():  # deleted in the working tree, a submodule, a dangling link
            continue
        data = path.read_bytes()
        if b"\0" in data:  # binary
            continue
        allowed = EXEMPT_LINES.get(name, ())
        found += [
            f"{name}:{number}: {line}"
            for number, line in labelled_lines(data.decode("utf-8", errors="replace"))
            if not any(snippet in line for snippet in allowed)
        ]
    assert not found, (
        "development-history labels; name what the file, section or setting holds "
        "instead:\n" + "\n".join(found)
    )
