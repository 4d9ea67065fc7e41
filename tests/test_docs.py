"""The documentation stays usable: links resolve, README stays short, Quick start commands exist.

Reads files only: no network, no training.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)[^)]*\)")  # [text](target "optional title")
CODE_BLOCK = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def relative_links(page: Path) -> list[str]:
    """Link targets of a Markdown page, outside code, without web links and pure anchors."""
    text = CODE_SPAN.sub("", CODE_BLOCK.sub("", page.read_text()))
    targets = [target for target in LINK.findall(text)
               if not target.startswith(("http://", "https://", "mailto:", "#"))]
    return [target.split("#", 1)[0] for target in targets]


def section(text: str, title: str) -> str:
    """The body of the `## title` section of a Markdown text."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README has no section '## {title}'"
    return match.group(1)


def quick_start_commands() -> list[str]:
    """The command lines of README's Quick start: inside its code blocks and code spans."""
    body = section(README.read_text(), "Quick start")
    lines = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", body, re.S | re.M):
        lines += block.splitlines()
    lines += [span.strip("`") for span in CODE_SPAN.findall(CODE_BLOCK.sub("", body))]
    return [line.split("#", 1)[0].strip() for line in lines if line.strip()]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    missing = [target for target in relative_links(page)
               if not (page.parent / target).exists()]
    assert not missing, f"{page.relative_to(ROOT)}: links to missing files: {missing}"


def test_the_pages_have_links_to_check():
    assert relative_links(README), "README.md: no relative link found; is the pattern broken?"


def test_readme_is_at_most_15000_bytes():
    size = README.stat().st_size
    assert size <= 15000, f"README.md is {size} bytes; move detail into docs/"


def test_quick_start_make_targets_exist():
    targets = [match for line in quick_start_commands()
               for match in re.findall(r"\bmake ([\w-]+)", line)]
    assert targets, "Quick start names no make target"
    makefile = (ROOT / "Makefile").read_text()
    defined = set(re.findall(r"^([\w-]+):", makefile, re.M))
    assert not set(targets) - defined, f"make targets missing: {set(targets) - defined}"


def test_quick_start_scripts_and_their_flags_exist():
    calls = [re.search(r"\bpython3? ((?:src|benchmarks)/\w+\.py)(.*)", line)
             for line in quick_start_commands()]
    calls = [call for call in calls if call]
    assert calls, "Quick start runs no python script"
    for call in calls:
        script = ROOT / call.group(1)
        assert script.is_file(), f"Quick start runs {call.group(1)}, which does not exist"
        source = script.read_text()
        for flag in re.findall(r"(?<![\w-])--[\w-]+", call.group(2)):
            assert f'"{flag}"' in source, f"{call.group(1)} defines no flag {flag}"
