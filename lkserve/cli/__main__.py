import sys

from lkserve.cli import main

sys.exit(main())
