"""``python -m moesiftornado_durable``: the same as the `moesiftornado-durable` command."""

from .cli import main

raise SystemExit(main())
