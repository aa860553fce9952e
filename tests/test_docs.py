"""The README stays short and is the way into docs/: at most 200 lines, every file under docs/ linked from it, and
every relative link in README.md and docs/*.md points at a file that exists."""

from __future__ import annotations

import re

from conftest import REPO

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def relative_links(path):
    return [m.group(1) for m in LINK.finditer(path.read_text()) if "://" not in m.group(1)]


def test_readme_is_short_and_links_every_docs_file():
    readme = REPO / "README.md"
    assert len(readme.read_text().splitlines()) <= 200
    linked = {(REPO / link).resolve() for link in relative_links(readme)}
    for doc in sorted((REPO / "docs").iterdir()):
        assert doc.resolve() in linked, f"{doc.name} is not linked from README.md"


def test_every_relative_link_resolves():
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *sorted((REPO / "benchmarks").glob("**/README.md"))]:
        for link in relative_links(page):
            assert (page.parent / link).exists(), f"{page.relative_to(REPO)}: broken link {link}"
