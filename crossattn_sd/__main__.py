"""`python -m crossattn_sd`: the crossattn-sd CLI, so `accelerate launch -m crossattn_sd batch ...` works."""

import sys

from .cli import main

sys.exit(main())
