import sys

from odegpt.commands.cli import main

sys.exit(main())
