"""``python -m avmp``: the ``avmp`` command, for environments without its script."""

from avmp.cli import main

raise SystemExit(main())
