import sys

from edge_awq.cli import main

sys.exit(main())
