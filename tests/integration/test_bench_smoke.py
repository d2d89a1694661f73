"""``python -m bench --quick`` runs every benchmark end to end and writes a sound document.

No figure is judged here (timings on a shared machine are not a test): only that each
benchmark ran, with its real parts (a daemon, supervisord, load processes), and that
the document has its parts and keeps the hand-written intro.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import BENCHMARKS
from bench.report import GENERATED_MARKER, Figure, Section, at_most_ratio, keep_intro, render

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@pytest.fixture(scope="module")
def quick_document(tmp_path_factory: pytest.TempPathFactory) -> tuple[int, str, str]:
    output = tmp_path_factory.mktemp("bench") / "benchmarks.md"
    output.write_text(f"# Our numbers\n\nA note kept across runs.\n\n{GENERATED_MARKER}\nold\n")
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )
    return done.returncode, done.stdout + done.stderr, output.read_text()


def test_the_quick_run_exits_zero_with_every_benchmark_run(
    quick_document: tuple[int, str, str],
) -> None:
    code, log, document = quick_document
    assert code == 0, log
    assert "Not run:" not in document


def test_the_document_keeps_the_intro_and_replaces_the_rest(
    quick_document: tuple[int, str, str],
) -> None:
    _, _, document = quick_document
    intro, generated = document.split(GENERATED_MARKER)
    assert intro == "# Our numbers\n\nA note kept across runs.\n\n"
    assert "old" not in generated.split("\n", 2)[1]
    assert "- Command: `python -m bench --quick --output" in generated


@pytest.mark.parametrize(
    "fact", ["CPU cores", "CPU model", "Memory", "Kernel", "Python", "supervisord"]
)
def test_the_document_describes_the_machine(
    quick_document: tuple[int, str, str], fact: str
) -> None:
    _, _, document = quick_document
    assert re.search(rf"^\| {fact} \| \S.* \|$", document, re.MULTILINE), document


def test_every_section_has_figures_beside_comparisons_and_verdicts(
    quick_document: tuple[int, str, str],
) -> None:
    _, _, document = quick_document
    sections = re.findall(r"^## (.+)$", document, re.MULTILINE)
    assert sections[:2] == ["Machine", "Summary"]
    assert len(sections) == 2 + len(BENCHMARKS)
    rows = re.findall(r"^\| (.+?) \| (.+?) \| (.+?) \| (.+?) \| (.*?) \|$", document, re.MULTILINE)
    verdicts = [row[4] for row in rows if row[4].endswith(("**pass**", "**FAIL**"))]
    assert len(verdicts) >= 8, document
    summary = document.split("## Summary")[1].split("\n## ")[0]
    assert "not measured" not in summary


def test_a_failed_target_and_a_benchmark_that_did_not_run_both_show() -> None:
    sections = [
        Section(
            key="a",
            title="Start",
            issue="issue 3",
            comparison="supervisord",
            method="m",
            figures=[Figure("start", "s", 2.0, 4.0, at_most_ratio(0.25, "≤ 1/4"))],
        ),
        Section(key="b", title="Broken", issue="", comparison="", method="", error="boom"),
    ]
    text = render(
        sections, intro=keep_intro(None), command="c", date="d", machine={"x": "y"}, duration_s=1
    )
    assert "| Start | start | ≤ 1/4 | **FAIL** |" in text
    assert "| 2.00 s | 4.00 s | 0.500 | ≤ 1/4: **FAIL** |" in text
    assert "| Broken | — | — | not run: boom |" in text
