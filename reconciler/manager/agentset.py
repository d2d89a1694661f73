"""AgentSet files and messages: parse the YAML an operator applies, and validate.

An AgentSet file is kubectl-style YAML with camelCase keys (``docs/manager.md``), one
or more documents separated by ``---``. ``load_agent_set_file`` / ``parse_agent_sets``
read it safely (bounded size; no anchors, aliases, tags or duplicate keys) into
``fleet.v1.AgentSet`` messages. Unknown keys and wrong types are errors naming the
path, e.g. ``spec.agents[2].restartPolicy``. Omitted agent fields take the model's
defaults (``state: running``, ``restartPolicy: Always``, ``stopGracePeriodSeconds:
10``).

``check_agent_set`` is the one validation of an AgentSet message. The CLI runs it on
what it parsed and the Manager runs it again on every message it receives (input is
hostile); agents are checked by ``reconciler.convert.spec_from_proto`` and the model's
``validate_spec``, so both sides apply the same rules.

Errors::

    InvalidArgument                 a field of one document (``field`` is its path)
    AgentSetFileError               a file problem: unreadable, too large, not safe
                                    YAML, or an InvalidArgument in document N

What it does not do: talk to the Manager, or decide where agents run (``plan.py``).
"""

from __future__ import annotations

import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from reconciler.api.agent.v1 import agent_pb2
from reconciler.api.fleet.v1 import fleet_pb2
from reconciler.convert import spec_from_proto
from reconciler.manager.plan import NodeSelector, SetDefinition
from reconciler.model.errors import InvalidArgument, PermanentError
from reconciler.model.ids import AgentId, is_valid_node_id
from reconciler.model.spec import AgentSpec, HeartbeatSpec, validate_spec
from reconciler.safeyaml import YamlRefused, kind_of, load_documents

__all__ = [
    "API_VERSION",
    "KIND",
    "MAX_AGENTS_PER_SET",
    "MAX_FILE_BYTES",
    "NAME_PATTERN",
    "AgentSetFileError",
    "CheckedAgentSet",
    "check_agent_set",
    "check_labels",
    "check_name",
    "check_selector",
    "load_agent_set_file",
    "parse_agent_sets",
]

API_VERSION: Final = "reconciler/v1"
KIND: Final = "AgentSet"
#: AgentSet files larger than this are refused before they are parsed (1 MiB).
MAX_FILE_BYTES: Final = 1024 * 1024
#: Agents one AgentSet may define.
MAX_AGENTS_PER_SET: Final = 10_000
#: An AgentSet name: 1-63 lower-case letters, digits and ``-``, starting with a letter.
NAME_PATTERN: Final = re.compile(r"[a-z][a-z0-9-]{0,62}")

_E = TypeVar("_E")
_MAX_NESTING: Final = 32
_MAX_LABEL: Final = 253
_MAX_SELECTOR_ITEMS: Final = 1000
_EXACT_INTEGER: Final = 2**53

_STATES: Final[Mapping[str, agent_pb2.DesiredState.ValueType]] = {
    "running": agent_pb2.DESIRED_STATE_RUNNING,
    "stopped": agent_pb2.DESIRED_STATE_STOPPED,
}
_POLICIES: Final[Mapping[str, agent_pb2.RestartPolicy.ValueType]] = {
    "Always": agent_pb2.RESTART_POLICY_ALWAYS,
    "OnFailure": agent_pb2.RESTART_POLICY_ON_FAILURE,
    "Never": agent_pb2.RESTART_POLICY_NEVER,
}
_TOP_KEYS: Final = ("apiVersion", "kind", "metadata", "spec")
_METADATA_KEYS: Final = ("name",)
_SPEC_KEYS: Final = ("nodeSelector", "agents")
_SELECTOR_KEYS: Final = ("matchLabels", "nodeIds")
_AGENT_KEYS: Final = (
    "id",
    "command",
    "env",
    "workingDir",
    "version",
    "state",
    "restartPolicy",
    "heartbeat",
    "stopGracePeriodSeconds",
    "config",
    "labels",
    "user",
)
_HEARTBEAT_KEYS: Final = ("intervalSeconds", "timeoutSeconds")
_DEFAULTS: Final = AgentSpec(id=AgentId("defaults"), command=("true",))
_HEARTBEAT_DEFAULTS: Final = HeartbeatSpec()


class AgentSetFileError(PermanentError):
    """An AgentSet file cannot be used; the message names the file (and the document
    and field when one is to blame)."""

    def __init__(self, source: str, problem: str, *, document: int | None = None) -> None:
        where = f"{source}: document {document}" if document is not None else source
        super().__init__(f"{where}: {problem}")
        self.source = source
        self.problem = problem
        self.document = document


@dataclass(frozen=True, slots=True)
class CheckedAgentSet:
    """A validated AgentSet: the message to store (apiVersion and kind filled in,
    bookkeeping cleared) and the planner's view of it."""

    message: fleet_pb2.AgentSet
    definition: SetDefinition

    @property
    def name(self) -> str:
        return self.definition.name


# ------------------------------------------------------------------------ safe YAML


def _documents(text: str, *, source: str) -> list[Any]:
    try:
        return load_documents(text, max_nesting=_MAX_NESTING, standard_tags=False)
    except YamlRefused as exc:
        raise AgentSetFileError(source, str(exc)) from None


def load_agent_set_file(path: str | os.PathLike[str]) -> list[fleet_pb2.AgentSet]:
    """The checked AgentSets of the file at ``path`` (see ``parse_agent_sets``)."""
    name = os.fspath(path)
    try:
        info = os.stat(name)
        if not stat.S_ISREG(info.st_mode):
            raise AgentSetFileError(name, "not a regular file")
        with open(name, "rb") as handle:
            data = handle.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise AgentSetFileError(name, f"cannot read: {exc.strerror}") from None
    if len(data) > MAX_FILE_BYTES:
        raise AgentSetFileError(name, f"larger than {MAX_FILE_BYTES} bytes (1 MiB)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AgentSetFileError(name, f"not UTF-8 text (byte {exc.start})") from None
    return parse_agent_sets(text, source=name)


def parse_agent_sets(text: str, *, source: str = "<input>") -> list[fleet_pb2.AgentSet]:
    """The AgentSets in ``text`` (empty documents skipped), each checked with
    ``check_agent_set``; names must be distinct. Raises ``AgentSetFileError``."""
    if len(text.encode()) > MAX_FILE_BYTES:
        raise AgentSetFileError(source, f"larger than {MAX_FILE_BYTES} bytes (1 MiB)")
    found: list[fleet_pb2.AgentSet] = []
    documents = [d for d in _documents(text, source=source) if d is not None]
    numbered = len(documents) > 1
    for index, document in enumerate(documents, start=1):
        try:
            message = check_agent_set(_agent_set(document)).message
        except InvalidArgument as exc:
            raise AgentSetFileError(
                source, str(exc), document=index if numbered else None
            ) from None
        if any(m.metadata.name == message.metadata.name for m in found):
            problem = f"metadata.name: AgentSet {message.metadata.name!r} appears twice"
            raise AgentSetFileError(source, problem, document=index)
        found.append(message)
    if not found:
        raise AgentSetFileError(source, "holds no AgentSet")
    return found


# ------------------------------------------------------------- YAML -> message


def _mapping(value: object, path: str, known: tuple[str, ...] | None = None) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidArgument(path or "(top level)", f"expected a mapping, got {kind_of(value)}")
    for key in value:
        if not isinstance(key, str):
            raise InvalidArgument(path or "(top level)", f"keys must be strings, got {key!r}")
        if known is not None and key not in known:
            dotted = f"{path}.{key}" if path else key
            raise InvalidArgument(dotted, f"unknown field (known here: {', '.join(known)})")
    return value


def _string(value: object, path: str) -> str:
    if not isinstance(value, str):
        raise InvalidArgument(path, f"expected a string, got {kind_of(value)}")
    return value


def _strings(value: object, path: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument(path, f"expected a list of strings, got {kind_of(value)}")
    return [_string(item, f"{path}[{i}]") for i, item in enumerate(value)]


def _string_map(value: object, path: str) -> dict[str, str]:
    mapping = _mapping(value, path)
    return {key: _string(item, f"{path}.{key}") for key, item in mapping.items()}


def _seconds(value: object, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(path, f"expected a number of seconds, got {kind_of(value)}")
    if not math.isfinite(value):
        raise InvalidArgument(path, "must be a finite number")
    return float(value)


def _choice(value: object, path: str, choices: Mapping[str, _E]) -> _E:
    if not isinstance(value, str) or value not in choices:
        raise InvalidArgument(path, f"must be one of {', '.join(choices)}, got {value!r}")
    return choices[value]


def _json(value: object, path: str) -> Any:
    """A config value as JSON data: mappings with string keys, lists, strings,
    finite numbers, booleans and null (YAML dates and the like are refused)."""
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if abs(value) > _EXACT_INTEGER:
            raise InvalidArgument(path, "integers beyond 2**53 would lose precision")
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidArgument(path, "numbers must be finite")
        return value
    if isinstance(value, list):
        return [_json(item, f"{path}[{i}]") for i, item in enumerate(value)]
    if isinstance(value, dict):
        return {key: _json(item, f"{path}.{key}") for key, item in _mapping(value, path).items()}
    raise InvalidArgument(path, f"expected JSON data, got {kind_of(value)} (quote it)")


def _heartbeat(value: object, path: str, message: agent_pb2.HeartbeatSpec) -> None:
    raw = _mapping(value, path, _HEARTBEAT_KEYS)
    interval = raw.get("intervalSeconds", _HEARTBEAT_DEFAULTS.interval_s)
    timeout = raw.get("timeoutSeconds", _HEARTBEAT_DEFAULTS.timeout_s)
    message.interval_seconds = _seconds(interval, f"{path}.intervalSeconds")
    message.timeout_seconds = _seconds(timeout, f"{path}.timeoutSeconds")


def _agent(value: object, path: str) -> agent_pb2.AgentSpec:
    raw = _mapping(value, path, _AGENT_KEYS)
    if value is None or "id" not in raw:
        raise InvalidArgument(f"{path}.id", "is required")
    grace = raw.get("stopGracePeriodSeconds", _DEFAULTS.stop_grace_period_s)
    spec = agent_pb2.AgentSpec(
        id=_string(raw["id"], f"{path}.id"),
        command=_strings(raw.get("command"), f"{path}.command"),
        env=_string_map(raw.get("env"), f"{path}.env"),
        working_dir=_string(raw.get("workingDir", ""), f"{path}.workingDir"),
        version=_string(raw.get("version", ""), f"{path}.version"),
        state=_choice(raw.get("state", str(_DEFAULTS.state)), f"{path}.state", _STATES),
        restart_policy=_choice(
            raw.get("restartPolicy", str(_DEFAULTS.restart_policy)),
            f"{path}.restartPolicy",
            _POLICIES,
        ),
        stop_grace_period_seconds=_seconds(grace, f"{path}.stopGracePeriodSeconds"),
        labels=_string_map(raw.get("labels"), f"{path}.labels"),
        user=_string(raw.get("user", ""), f"{path}.user"),
    )
    if raw.get("heartbeat") is not None:
        _heartbeat(raw["heartbeat"], f"{path}.heartbeat", spec.heartbeat)
    config = _mapping(raw.get("config"), f"{path}.config")
    if config:
        spec.config.update(_json(config, f"{path}.config"))
    return spec


def _agent_set(document: object) -> fleet_pb2.AgentSet:
    raw = _mapping(document, "", _TOP_KEYS)
    metadata = _mapping(raw.get("metadata"), "metadata", _METADATA_KEYS)
    spec = _mapping(raw.get("spec"), "spec", _SPEC_KEYS)
    selector = _mapping(spec.get("nodeSelector"), "spec.nodeSelector", _SELECTOR_KEYS)
    agents = spec.get("agents")
    if not isinstance(agents, list):
        raise InvalidArgument("spec.agents", f"expected a list of agents, got {kind_of(agents)}")
    message = fleet_pb2.AgentSet(
        api_version=_string(raw.get("apiVersion", ""), "apiVersion"),
        kind=_string(raw.get("kind", ""), "kind"),
    )
    message.metadata.name = _string(metadata.get("name", ""), "metadata.name")
    message.spec.node_selector.match_labels.update(
        _string_map(selector.get("matchLabels"), "spec.nodeSelector.matchLabels")
    )
    message.spec.node_selector.node_ids.extend(
        _strings(selector.get("nodeIds"), "spec.nodeSelector.nodeIds")
    )
    for index, agent in enumerate(agents):
        message.spec.agents.append(_agent(agent, f"spec.agents[{index}]"))
    return message


# ------------------------------------------------------------------------ checks


def check_name(name: str, *, path: str = "metadata.name") -> str:
    """``name`` when it may name an AgentSet; else ``InvalidArgument``."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(
            path,
            f"{name!r} is not a valid AgentSet name (1-63 lower-case letters, digits "
            "and '-', starting with a letter)",
        )
    return name


def check_labels(labels: Mapping[str, str], *, path: str) -> dict[str, str]:
    """``labels`` as a dict when every key and value may be a label (non-empty keys,
    at most 253 characters, no NUL); else ``InvalidArgument``."""
    if len(labels) > _MAX_SELECTOR_ITEMS:
        raise InvalidArgument(path, f"at most {_MAX_SELECTOR_ITEMS} labels")
    for key, value in labels.items():
        if not key or len(key) > _MAX_LABEL or "\x00" in key:
            raise InvalidArgument(path, f"{key[:64]!r} is not a valid label key")
        if len(value) > _MAX_LABEL or "\x00" in value:
            raise InvalidArgument(f"{path}.{key}", "is not a valid label value")
    return dict(labels)


def check_selector(
    labels: Mapping[str, str], node_ids: list[str] | tuple[str, ...], *, path: str
) -> NodeSelector:
    """The planner's selector for checked labels and node ids."""
    check_labels(labels, path=f"{path}.matchLabels")
    if len(node_ids) > _MAX_SELECTOR_ITEMS:
        raise InvalidArgument(f"{path}.nodeIds", f"at most {_MAX_SELECTOR_ITEMS} node ids")
    for index, node_id in enumerate(node_ids):
        if not is_valid_node_id(node_id):
            raise InvalidArgument(f"{path}.nodeIds[{index}]", f"{node_id!r} is not a node id")
    return NodeSelector(match_labels=dict(labels), node_ids=frozenset(node_ids))


def _check_agents(agents: Any) -> tuple[AgentSpec, ...]:
    if len(agents) > MAX_AGENTS_PER_SET:
        raise InvalidArgument("spec.agents", f"at most {MAX_AGENTS_PER_SET} agents")
    specs: list[AgentSpec] = []
    seen: set[str] = set()
    for index, message in enumerate(agents):
        path = f"spec.agents[{index}]"
        spec = spec_from_proto(message, path=path)
        validate_spec(spec, path=path)
        if spec.id in seen:
            raise InvalidArgument(f"{path}.id", f"duplicate agent id {spec.id!r} in this set")
        seen.add(spec.id)
        specs.append(spec)
    return tuple(specs)


def check_agent_set(message: fleet_pb2.AgentSet) -> CheckedAgentSet:
    """Validate an AgentSet message; ``InvalidArgument`` naming the first bad field."""
    if message.api_version not in ("", API_VERSION):
        raise InvalidArgument("apiVersion", f"must be {API_VERSION!r}")
    if message.kind not in ("", KIND):
        raise InvalidArgument("kind", f"must be {KIND!r}")
    name = check_name(message.metadata.name)
    selector_message = message.spec.node_selector
    selector = check_selector(
        selector_message.match_labels,
        list(selector_message.node_ids),
        path="spec.nodeSelector",
    )
    agents = _check_agents(message.spec.agents)
    stored = fleet_pb2.AgentSet(api_version=API_VERSION, kind=KIND)
    stored.metadata.name = name
    stored.spec.CopyFrom(message.spec)
    definition = SetDefinition(name=name, selector=selector, agents=agents)
    return CheckedAgentSet(message=stored, definition=definition)
