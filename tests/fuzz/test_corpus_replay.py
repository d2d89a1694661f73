"""Replay every committed fuzz corpus file through its target, as an ordinary test.

The corpus under ``fuzz/corpus/<target>/`` is what coverage-guided fuzzing kept
(``make fuzz``, ``docs/fuzzing.md``); replaying it checks, without atheris, that no
input that once reached a new branch now raises anything but the surface's own
rejection or breaks an invariant the target asserts.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fuzz.targets import TARGETS

__all__: list[str] = []

CORPUS = Path(__file__).resolve().parents[2] / "fuzz" / "corpus"
#: The committed corpus stays small enough to review and to replay in seconds.
MAX_CORPUS_BYTES = 4 * 1024 * 1024

CASES = [
    pytest.param(target, path, id=f"{target}/{path.name[:12]}")
    for target in sorted(TARGETS)
    for path in sorted((CORPUS / target).glob("*"))
]


@pytest.mark.parametrize(("target", "path"), CASES)
def test_a_committed_corpus_input_is_handled_without_a_finding(target: str, path: Path) -> None:
    TARGETS[target](path.read_bytes())


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_every_target_has_a_committed_corpus(target: str) -> None:
    assert len(list((CORPUS / target).glob("*"))) >= 3


def test_the_committed_corpus_stays_small() -> None:
    total = sum(path.stat().st_size for path in CORPUS.rglob("*") if path.is_file())
    assert total < MAX_CORPUS_BYTES
