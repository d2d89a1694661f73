"""`tools/gen-proto --check`: committed generated code must match api/proto.

Runs the real script on a copy of api/proto and reconciler/api in a temp directory, so
the working tree is never touched. The contents of the contract itself are checked in
test_api_contract.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GEN_PROTO = REPO / "tools" / "gen-proto"
STALE_MESSAGE = "generated code is stale: run `make gen`"


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A directory holding copies of api/proto and the committed reconciler/api."""
    shutil.copytree(REPO / "api" / "proto", tmp_path / "api" / "proto")
    shutil.copytree(
        REPO / "reconciler" / "api",
        tmp_path / "reconciler" / "api",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
    )
    return tmp_path


def gen_proto(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(GEN_PROTO), sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def add_a_field(root: Path) -> str:
    proto = root / "api/proto/reconciler/api/agent/v1/node.proto"
    text = proto.read_text()
    marker = "  uint32 agent_count = 13;\n"
    assert marker in text
    proto.write_text(text.replace(marker, marker + "  // Added.\n  string zone = 14;\n"))
    return "reconciler/api/agent/v1/node_pb2.py"


def delete_a_proto(root: Path) -> str:
    (root / "api/proto/reconciler/api/agent/v1/node.proto").unlink()
    fleet = root / "api/proto/reconciler/api/fleet/v1/fleet.proto"
    text = fleet.read_text()
    # The fleet API needs node.proto; make it self-contained by dropping what uses it.
    text = text.replace('import "reconciler/api/agent/v1/node.proto";\n', "")
    text = text.replace("reconciler.api.agent.v1.NodeStatus status = 2;", "string status = 2;")
    text = text.replace("repeated reconciler.api.agent.v1.NodeInfo nodes", "repeated string nodes")
    text = text.replace("reconciler.api.agent.v1.NodeInfo node = 1;", "string node = 1;")
    fleet.write_text(text)
    return "reconciler/api/agent/v1/node_pb2.py"


def edit_generated_code(root: Path) -> str:
    generated = root / "reconciler/api/daemon/v1/daemon_pb2.py"
    generated.write_text(generated.read_text() + "\n# edited by hand\n")
    return "reconciler/api/daemon/v1/daemon_pb2.py"


def test_check_passes_on_the_committed_code(checkout: Path) -> None:
    result = gen_proto(checkout, "--check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "up to date" in result.stdout


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(add_a_field, id="a-field-added-to-a-proto"),
        pytest.param(delete_a_proto, id="a-proto-deleted"),
        pytest.param(edit_generated_code, id="generated-code-edited-by-hand"),
    ],
)
def test_check_fails_naming_the_stale_file_when_code_and_protos_disagree(
    checkout: Path, change: Callable[[Path], str]
) -> None:
    stale_file = change(checkout)
    result = gen_proto(checkout, "--check")
    assert result.returncode == 1, result.stdout + result.stderr
    assert STALE_MESSAGE in result.stdout
    assert stale_file in result.stdout


def test_check_changes_nothing_in_the_tree(checkout: Path) -> None:
    add_a_field(checkout)
    before = sorted(p.read_bytes() for p in (checkout / "reconciler").rglob("*") if p.is_file())
    gen_proto(checkout, "--check")
    after = sorted(p.read_bytes() for p in (checkout / "reconciler").rglob("*") if p.is_file())
    assert after == before


def test_gen_makes_a_stale_tree_pass_the_check_again(checkout: Path) -> None:
    add_a_field(checkout)
    generated = gen_proto(checkout)
    assert generated.returncode == 0, generated.stdout + generated.stderr
    assert "zone" in (checkout / "reconciler/api/agent/v1/node_pb2.pyi").read_text()
    assert gen_proto(checkout, "--check").returncode == 0


def test_gen_output_is_the_same_every_time(checkout: Path) -> None:
    assert gen_proto(checkout).returncode == 0
    first = {p: p.read_bytes() for p in (checkout / "reconciler").rglob("*") if p.is_file()}
    assert gen_proto(checkout).returncode == 0
    second = {p: p.read_bytes() for p in (checkout / "reconciler").rglob("*") if p.is_file()}
    assert second == first
