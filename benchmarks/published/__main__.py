"""``python -m benchmarks.published``: estimate every published row, write the results and the README section."""

from .run import main

raise SystemExit(main())
