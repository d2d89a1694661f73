"""The store's pieces that need no database: ``ApplyChange``'s own checks, picking a
backend from the settings, and what the in-memory fake adds for service tests.

Every ``ManagerStore`` method is covered on all three backends, the fake included, by
``tests/integration/test_manager_store.py``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from reconciler.config import ManagerSettings, StoreBackend, StoreSettings
from reconciler.manager.records import AgentSetRecord, ApplyChange, DesiredRecord, NodeRecord
from reconciler.manager.store import open_store, sqlite_path_of
from reconciler.manager.store.memory import MemoryStore
from reconciler.manager.store.postgres import PostgresStore
from reconciler.manager.store.sqlite import SqliteStore
from reconciler.model.errors import InvalidArgument, Unavailable


def agent_set(revision: int = 1) -> AgentSetRecord:
    return AgentSetRecord("web", revision, "{}", created_at=1.0, updated_at=1.0)


def desired(node_id: str) -> DesiredRecord:
    return DesiredRecord(node_id, 1, "[]", updated_at=1.0)


MALFORMED_CHANGES = [
    pytest.param(
        {"agent_set": agent_set(), "delete_name": "web"}, "delete_name", id="put-and-delete"
    ),
    pytest.param({"expected_revision": 3}, "expected_revision", id="revision-without-a-set"),
    pytest.param(
        {"agent_set": agent_set(2), "expected_revision": 2},
        "agent_set.revision",
        id="revision-not-increased",
    ),
    pytest.param({"agent_set": agent_set(0)}, "agent_set.revision", id="new-set-at-revision-zero"),
    pytest.param({"desired": (desired("node-a"), desired("node-a"))}, "desired", id="a-node-twice"),
]


@pytest.mark.parametrize(("fields", "bad_field"), MALFORMED_CHANGES)
def test_a_malformed_change_is_refused_naming_the_field(
    fields: dict[str, object], bad_field: str
) -> None:
    with pytest.raises(InvalidArgument) as caught:
        ApplyChange(**fields)  # type: ignore[arg-type]

    assert caught.value.field == bad_field


def test_a_change_names_the_agent_set_it_puts_or_deletes() -> None:
    assert ApplyChange(agent_set=agent_set()).target_name == "web"
    assert ApplyChange(delete_name="db", expected_revision=4).target_name == "db"
    assert ApplyChange(desired=(desired("node-a"),)).target_name is None


def test_the_default_backend_is_sqlite_in_the_state_directory(tmp_path: Path) -> None:
    settings = ManagerSettings(state_dir=str(tmp_path))

    store = open_store(settings)

    assert isinstance(store, SqliteStore)
    assert store.path == tmp_path / "manager.db"
    assert not store.path.exists()  # nothing is touched before the first call


def test_an_explicit_sqlite_path_wins_over_the_state_directory(tmp_path: Path) -> None:
    settings = ManagerSettings(
        state_dir=str(tmp_path), store=StoreSettings(sqlite_path=str(tmp_path / "x.db"))
    )

    assert sqlite_path_of(settings) == tmp_path / "x.db"


def test_the_postgres_backend_connects_only_when_first_used() -> None:
    settings = ManagerSettings(
        store=StoreSettings(
            backend=StoreBackend.POSTGRES, postgres_dsn="host=127.0.0.1 port=1", pool_size=3
        )
    )

    assert isinstance(open_store(settings), PostgresStore)


async def test_an_unavailable_memory_store_raises_until_it_is_available_again() -> None:
    store = MemoryStore()
    store.set_available(False)

    with pytest.raises(Unavailable):
        await store.list_nodes()

    store.set_available(True)
    assert await store.list_nodes() == []


async def test_the_memory_store_keeps_its_own_copy_of_a_nodes_labels() -> None:
    store = MemoryStore()
    labels = {"role": "edge"}
    node = NodeRecord("node-a", "h", "10.0.0.1", labels, "1", "", (), 1.0, 1.0)

    returned = await store.upsert_node(node)
    labels["role"] = "changed"
    returned.labels["role"] = "changed too"

    stored = await store.get_node("node-a")
    assert stored is not None
    assert stored.labels == {"role": "edge"}
