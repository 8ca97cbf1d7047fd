"""``python -m batchtask check|reconfigure ...``: see `batchtask._cli`."""

import sys

from batchtask._cli import main

if __name__ == "__main__":
    sys.exit(main())
