import sys

from policyserve.cli.main import main

sys.exit(main())
