"""The README stays a page for users (issue: one house): at most 250 lines, no run history (dates, commit
hashes), and every docs/ page it links to exists."""

import os
import re

from support.paths import ROOT

PAGES = ["README.md", "benchmarks/README.md"] + [os.path.join("docs", n) for n in sorted(os.listdir(os.path.join(ROOT, "docs")))
                                               if n.endswith(".md")]


def _read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as f:
        return f.read()


def test_readme_is_at_most_250_lines_and_its_links_exist():
    text = _read("README.md")
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)", text)
    assert links and [link for link in links if not os.path.exists(os.path.join(ROOT, link))] == []


def test_no_dates_or_commit_hashes_in_the_docs():
    for name in PAGES:
        found = re.findall(r"\b20\d\d-[01]\d-[0-3]\d\b|\b[0-9a-f]{10,40}\b", _read(name))
        assert not found, f"{name}: {found}"
