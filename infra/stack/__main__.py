"""`python -m infra.stack up|down|status|env`: the local services (services.py)."""

import sys

from infra.stack.services import main

sys.exit(main())
