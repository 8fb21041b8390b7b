import sys

from meshtoll.cli import main

sys.exit(main())
