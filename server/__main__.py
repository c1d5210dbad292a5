"""``python -m server``: the ``order-gateway`` command."""

import sys

from server.launch import main

sys.exit(main())
