"""Files others could change are refused at start, by the real daemon and Manager.

A settings file decides what runs and whom the process trusts; a state directory
holds what it promised. Either one writable by group or others, or reached through a
symbolic link someone could re-point, makes the process refuse to start, naming the
file and the fix, before it listens on anything.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

__all__: list[str] = []

ROLES = [pytest.param("daemon", id="daemon"), pytest.param("manager", id="manager")]


def settings(role: str, root: Path) -> dict[str, object]:
    common: dict[str, object] = {
        "state_dir": str(root / "state"),
        "grpc": {"listen": "127.0.0.1:0"},
        "metrics": {"listen": ""},
    }
    if role == "daemon":
        common["node"] = {"id": "node-sec"}
        common["heartbeat"] = {"socket_path": str(root / "run" / "hb.sock"), "http_listen": ""}
    return common


def start(role: str, config: Path) -> subprocess.CompletedProcess[str]:
    """Run the process; it must stop by itself, refusing (a deadline, not a wait)."""
    return subprocess.run(
        [sys.executable, "-m", "reconciler", role, "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write_config(role: str, root: Path) -> Path:
    path = root / f"{role}.yaml"
    path.write_text(yaml.safe_dump(settings(role, root)))
    path.chmod(0o600)
    return path


def group_writable(path: Path) -> Path:
    path.chmod(0o620)
    return path


def world_writable(path: Path) -> Path:
    path.chmod(0o602)
    return path


def symlinked(path: Path) -> Path:
    link = path.with_name("link-" + path.name)
    link.symlink_to(path)
    return link


UNSAFE_CONFIGS = [
    pytest.param(group_writable, "is writable by group or others (mode 0620)", id="group-writable"),
    pytest.param(world_writable, "is writable by group or others (mode 0602)", id="world-writable"),
    pytest.param(symlinked, "is a symbolic link", id="symlinked"),
]


@pytest.mark.slow
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize(("make_unsafe", "problem"), UNSAFE_CONFIGS)
def test_an_unsafe_config_file_is_refused_at_start_naming_the_file(
    tmp_path: Path, role: str, make_unsafe: Callable[[Path], Path], problem: str
) -> None:
    config = make_unsafe(write_config(role, tmp_path))
    finished = start(role, config)
    assert finished.returncode != 0
    assert f"{config}: {problem}" in finished.stderr
    assert not (tmp_path / "state").exists(), "it started before refusing"


@pytest.mark.slow
@pytest.mark.parametrize("role", ROLES)
def test_a_private_config_file_is_accepted(tmp_path: Path, role: str) -> None:
    config = write_config(role, tmp_path)
    finished = subprocess.run(
        [sys.executable, "-m", "reconciler", "config", "check", str(config), "--role", role],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr


def open_state(root: Path) -> str:
    (root / "state").mkdir(mode=0o700)
    (root / "state").chmod(0o777)
    return "is writable by group or others (mode 0777)"


def linked_state(root: Path) -> str:
    (root / "elsewhere").mkdir(mode=0o700)
    (root / "state").symlink_to(root / "elsewhere")
    return "is a symlink"


UNSAFE_STATE_DIRS = [
    pytest.param(open_state, id="world-writable"),
    pytest.param(linked_state, id="symlinked"),
]


@pytest.mark.slow
@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("make_unsafe", UNSAFE_STATE_DIRS)
def test_an_unsafe_state_directory_is_refused_at_start(
    tmp_path: Path, role: str, make_unsafe: Callable[[Path], str]
) -> None:
    problem = make_unsafe(tmp_path)
    finished = start(role, write_config(role, tmp_path))
    assert finished.returncode != 0
    assert f"state directory {tmp_path / 'state'} {problem}" in finished.stderr
    assert not any(tmp_path.glob("elsewhere/*")), "wrote through the symlink"
