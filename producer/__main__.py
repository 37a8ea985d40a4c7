"""`python -m producer URLS_FILE`."""

from .cli import main

raise SystemExit(main())
