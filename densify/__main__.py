import sys

from densify.cli import main

sys.exit(main())
