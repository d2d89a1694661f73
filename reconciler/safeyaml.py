"""Strict, safe YAML for every file an operator hands reconciler (settings, AgentSets).

``load_documents`` composes with PyYAML's SafeLoader and refuses, while composing and
before any object is built: anchors and aliases (so an "alias bomb" costs nothing),
tags (all of them, or all but YAML's standard ones), duplicate keys and nesting past a
bound. Every refusal or syntax error is a ``YamlRefused`` whose text says what and
where (line, column); callers wrap it in their own error naming the file.
"""

from __future__ import annotations

from typing import Any

import yaml

__all__ = ["YamlRefused", "kind_of", "load_documents"]


class YamlRefused(ValueError):
    """The text is not YAML reconciler accepts; the message says why and where."""


def load_documents(text: str, *, max_nesting: int, standard_tags: bool) -> list[Any]:
    """The documents of ``text``. ``standard_tags`` admits YAML's own tags (``!!str``)."""
    try:
        loader = _StrictLoader(text, max_nesting=max_nesting, standard_tags=standard_tags)
    except yaml.reader.ReaderError as exc:  # a control character, found before parsing
        problem = f"not valid YAML: character #x{exc.character:04x} at offset {exc.position}"
        raise YamlRefused(problem) from None
    try:
        documents = []
        while loader.check_data():  # type: ignore[no-untyped-call]
            documents.append(loader.get_data())
        return documents
    except YamlRefused:
        raise
    except yaml.MarkedYAMLError as exc:
        raise YamlRefused(f"not valid YAML: {exc.problem}{_where(exc.problem_mark)}") from None
    except yaml.YAMLError as exc:
        raise YamlRefused(f"not valid YAML: {exc}") from None
    finally:
        loader.dispose()


def kind_of(value: object) -> str:
    """What a loaded YAML value is, in words: 'a boolean', 'a mapping', 'null', ..."""
    kinds: list[tuple[type, str]] = [
        (bool, "a boolean"),
        (int, "an integer"),
        (float, "a number"),
        (str, "a string"),
        (list, "a list"),
        (dict, "a mapping"),
    ]
    if value is None:
        return "null"
    return next((name for cls, name in kinds if isinstance(value, cls)), type(value).__name__)


def _where(mark: Any) -> str:
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""


class _StrictLoader(yaml.SafeLoader):
    """A SafeLoader that refuses what the module note lists while it composes."""

    def __init__(self, stream: str, *, max_nesting: int, standard_tags: bool) -> None:
        super().__init__(stream)
        self._depth = 0
        self._max_nesting = max_nesting
        self._standard_tags = standard_tags

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        self._refuse(event)
        self._depth += 1
        try:
            if self._depth > self._max_nesting:
                problem = f"nesting deeper than {self._max_nesting} levels"
                raise YamlRefused(problem + _where(event.start_mark))
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def compose_mapping_node(self, anchor: Any) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)
        seen: set[tuple[str, str]] = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if (key_node.tag, key_node.value) in seen:
                    problem = f"duplicate key {key_node.value!r}"
                    raise YamlRefused(problem + _where(key_node.start_mark))
                seen.add((key_node.tag, key_node.value))
        return node

    def _refuse(self, event: yaml.Event) -> None:
        where = _where(event.start_mark)
        if isinstance(event, yaml.AliasEvent):
            raise YamlRefused(f"YAML aliases are not allowed (*{event.anchor}){where}")
        anchor = getattr(event, "anchor", None)
        if anchor is not None:
            raise YamlRefused(f"YAML anchors are not allowed (&{anchor}){where}")
        tag = getattr(event, "tag", None)
        if tag in (None, "!"):
            return
        if not self._standard_tags:
            raise YamlRefused(f"YAML tags are not allowed ({tag}){where}")
        if tag not in self.yaml_constructors:
            short = tag.replace("tag:yaml.org,2002:", "!!")
            raise YamlRefused(f"YAML tag {short} is not allowed{where}")
