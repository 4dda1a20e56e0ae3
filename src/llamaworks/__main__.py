import sys

from llamaworks.cli import main

sys.exit(main())
