"""Write one benchmark's section of docs/benchmarks.md, leaving every other section byte for byte."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
DOCS_HEADER = ("# Benchmarks\n\nMeasured figures of the tools in tools/, each section written by the tool "
               "named in its title.\n")


def write_docs_section(title: str, section: str, docs: Path = DOCS) -> None:
    """Replace the section starting with `title` (a "## ..." line) by `section`, or append it.

    The file is re-read right before writing: several tools (and people) edit it.
    """
    text = docs.read_text() if docs.is_file() else DOCS_HEADER
    start = text.find(title)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        following = text.find("\n## ", start + len(title))
        text = text[:start] + section.rstrip("\n") + "\n" + ("\n" + text[following + 1:] if following >= 0 else "")
    docs.parent.mkdir(parents=True, exist_ok=True)
    docs.write_text(text.rstrip("\n") + "\n")
    print(f"wrote {docs}")


def report(title: str, lines: list[str], write_docs: bool) -> None:
    """Print a benchmark's Markdown section; with `write_docs` also put it into docs/benchmarks.md."""
    text = "\n".join(lines)
    print(text)
    if write_docs:
        write_docs_section(title, text + "\n")
