"""`python -m fastprompt ...`: the command line, as torchrun starts it (`torchrun --nproc_per_node N -m fastprompt`)."""

import sys

from .cli import main

sys.exit(main())
