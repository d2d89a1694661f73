"""Inputs the fuzzers found that once escaped as the wrong exception, named and kept.

Each test holds the smallest form of one finding; the raw finding is also in the
committed corpus (``fuzz/corpus``) that ``test_corpus_replay`` replays.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.config import ConfigError, DaemonSettings, ManagerSettings, load_settings
from reconciler.manager.agentset import AgentSetFileError, parse_agent_sets

__all__: list[str] = []

CONTROL_CHARACTERS = [
    pytest.param("\x0bnode: {}\n", id="vertical-tab-first"),
    pytest.param("node:\n  id: a\x00b\n", id="nul-in-a-value"),
    pytest.param("# \x1b[31m\n", id="escape-in-a-comment"),
]


@pytest.mark.parametrize("text", CONTROL_CHARACTERS)
@pytest.mark.parametrize("cls", [DaemonSettings, ManagerSettings], ids=["daemon", "manager"])
def test_a_settings_file_with_a_control_character_is_a_config_error_naming_the_file(
    tmp_path: Path, text: str, cls: type[DaemonSettings] | type[ManagerSettings]
) -> None:
    path = tmp_path / "settings.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="not valid YAML: character #x") as caught:
        load_settings(cls, path, env={})
    assert str(path) in str(caught.value)


@pytest.mark.parametrize("text", CONTROL_CHARACTERS)
def test_an_agentset_file_with_a_control_character_is_an_agentset_file_error(text: str) -> None:
    with pytest.raises(AgentSetFileError, match="not valid YAML: character #x"):
        parse_agent_sets(text, source="sets.yaml")
