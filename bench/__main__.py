"""`python -m bench [--quick|--full]`."""

from bench.run import main

raise SystemExit(main())
