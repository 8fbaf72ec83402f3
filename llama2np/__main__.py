"""``python -m llama2np``: see llama2np.cli."""

from .cli.commands import main

raise SystemExit(main())
