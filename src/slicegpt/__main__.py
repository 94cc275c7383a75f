import sys

from slicegpt.cli import main

sys.exit(main())
