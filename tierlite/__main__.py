import sys

from tierlite.cli import main

sys.exit(main())
