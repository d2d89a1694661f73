"""``python -m reconciler`` runs the command line, like the ``reconciler`` script."""

from reconciler.cli.main import main

raise SystemExit(main())
