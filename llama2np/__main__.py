"""``python -m llama2np``: see llama2np.cli."""

from .cli import main

raise SystemExit(main())
