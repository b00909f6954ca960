"""python -m msc_dist VERB ... = the ``msc`` command."""

import sys

from msc_dist.cli import main

if __name__ == "__main__":
    sys.exit(main())
