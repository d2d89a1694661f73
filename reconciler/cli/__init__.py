"""The ``reconciler`` command: one click group, one module per command.

``main.py`` builds the group and maps expected errors to one-line messages;
``output.py`` prints data as a table, JSON or YAML; ``connection.py`` decides which
Manager to talk to; ``options.py`` holds the option types and decorators that several
commands share. Each ``*_cmd.py`` module holds one command (or one command group).
The commands stay thin: they parse options, call into ``reconciler.daemon``,
``reconciler.manager`` or a gRPC client, and print.
"""

__all__: list[str] = []
