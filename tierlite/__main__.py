import sys

from tierlite.tools.cli import main

sys.exit(main())
