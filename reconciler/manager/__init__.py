"""The Manager: the fleet's control plane.

Where to start reading:

- ``plan.py``      pure: AgentSets + nodes -> each node's desired agents and generation
- ``agentset.py``  the AgentSet file format and the one validation of AgentSets
- ``fleet.py``     ``FleetChanges`` (the only writer of desired state) and FleetService
- ``service.py``   ManagerService (what daemons call) and the derived node status
- ``push.py``      pushing desired state to daemons, bounded, coalesced and retried
- ``app.py``       ``ManagerApp``: settings -> store, servers, health, metrics
- ``records.py`` and ``store/``: what the Manager keeps, behind one Protocol

Nothing is imported here, so ``reconciler.manager.store`` stays cheap to import.
"""

__all__: list[str] = []
