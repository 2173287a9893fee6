import sys

from hastore.cli.main import main

sys.exit(main())
