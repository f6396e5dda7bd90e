"""The design document the code cites: every ``docs/design.md §<anchor>`` in src/, tests/,
benchmarks/ and experiments/ names an anchor that exists, and no module cites the old, unpublished
SPEC."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DESIGN = ROOT / "docs" / "design.md"
CITATION = re.compile(r"docs/design\.md\s+§([A-Za-z0-9-]+)")


def sources() -> list[Path]:
    return sorted(
        p
        for folder in ("src", "tests", "benchmarks", "experiments")
        for p in (ROOT / folder).rglob("*.py")
    )


def test_every_citation_names_an_anchor():
    anchors = set(re.findall(r'<a id="([A-Za-z0-9-]+)"></a>', DESIGN.read_text()))
    cited = {
        (path.relative_to(ROOT).as_posix(), anchor)
        for path in sources()
        for anchor in CITATION.findall(path.read_text())
    }
    assert cited, "no citations found"
    missing = sorted((where, anchor) for where, anchor in cited if anchor not in anchors)
    assert not missing, f"citations of anchors docs/design.md does not define: {missing}"


def test_anchors_cited_in_the_document_itself_exist():
    text = DESIGN.read_text()
    anchors = set(re.findall(r'<a id="([A-Za-z0-9-]+)"></a>', text))
    links = set(re.findall(r"\]\(#([A-Za-z0-9-]+)\)", text)) | set(
        re.findall(r"§([a-z0-9-]+)", text)
    )
    assert links <= anchors, f"dangling: {sorted(links - anchors)}"


def test_no_spec_citations_left():
    left = sorted(
        path.relative_to(ROOT).as_posix()
        for path in sources()
        if re.search(r"\bSPEC( section)?s? ?\d", path.read_text())
    )
    assert not left, f"cite docs/design.md §<anchor> instead of SPEC in: {left}"
