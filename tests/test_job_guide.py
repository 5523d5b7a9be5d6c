"""docs/job-development.md shows its worked example as the code is: every ```python block marked
`<!-- file: PATH -->` is a region of PATH, in file order, and together they are the whole file."""

from __future__ import annotations

import difflib
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GUIDE = REPO / "docs" / "job-development.md"
MARKED = re.compile(r"^<!-- file: (?P<path>\S+) -->\n```python\n(?P<code>.*?)^```$", re.MULTILINE | re.DOTALL)
SHOWN = {"tests/guide_example.py", "tests/test_guide_example.py"}


def blocks() -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for match in MARKED.finditer(GUIDE.read_text(encoding="utf-8")):
        found.setdefault(match["path"], []).append(match["code"])
    return found


def first_difference(expected: str, shown: str) -> str:
    diff = difflib.unified_diff(expected.splitlines(), shown.splitlines(), "file", "guide", n=1, lineterm="")
    return "\n".join(list(diff)[:12])


def test_the_guide_shows_the_worked_example_whole_and_as_it_is() -> None:
    shown = blocks()
    assert set(shown) == SHOWN
    for path, parts in shown.items():
        text = (REPO / path).read_text(encoding="utf-8")
        at = 0
        for number, code in enumerate(parts, 1):
            found = text.find(code, at)
            assert found >= 0, f"{path}, block {number} of the guide is not the file's code:\n" + first_difference(
                text[at : at + len(code)], code
            )
            assert not text[at:found].strip(), f"{path}: the guide skips code before its block {number}:\n" + (
                text[at:found].strip()
            )
            at = found + len(code)
        assert not text[at:].strip(), f"{path}: the guide does not show its end:\n{text[at:].strip()}"
