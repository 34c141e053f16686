"""tools/docs_section.py: a benchmark rewrites its own section of docs/benchmarks.md and nothing else."""

from tools.docs_section import write_docs_section


def test_replaces_its_section_and_keeps_the_others(tmp_path):
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## A (tools/a.py)\nold a\n\n## B (tools/b.py)\nb stays\n")
    write_docs_section("## A (tools/a.py)", "## A (tools/a.py)\nnew a\n", docs)
    assert docs.read_text() == "# Benchmarks\n\n## A (tools/a.py)\nnew a\n\n## B (tools/b.py)\nb stays\n"
    write_docs_section("## C (tools/c.py)", "## C (tools/c.py)\nc\n", docs)
    assert docs.read_text().endswith("b stays\n\n## C (tools/c.py)\nc\n")
    write_docs_section("## B (tools/b.py)", "## B (tools/b.py)\nnew b\n", docs)
    assert "b stays" not in docs.read_text() and docs.read_text().count("## C") == 1


def test_creates_the_file_with_a_header(tmp_path):
    docs = tmp_path / "docs" / "benchmarks.md"
    write_docs_section("## A (tools/a.py)", "## A (tools/a.py)\na\n", docs)
    assert docs.read_text().startswith("# Benchmarks\n") and docs.read_text().endswith("## A (tools/a.py)\na\n")
