import sys

from odegpt.cli import main

sys.exit(main())
