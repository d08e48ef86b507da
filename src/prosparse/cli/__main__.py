import sys

from prosparse.cli.main import main

sys.exit(main())
