"""``python -m recon_server.cli``: the same entry as the ``recon-server`` console script."""

import sys

from recon_server.cli.main import main

sys.exit(main())
