"""crossattn-sd web UI: `python app.py [--host H] [--port P] [--model PRESET] [--share] [--auth user:password]
[--outputs DIR] [--allow-any-model]`, the same as `crossattn-sd serve` (serves on 127.0.0.1:7860).

`crossattn_sd.ui.serve` assembles it: model preset -> `AttentionService` -> `build_demo` -> queue -> launch.
"""

import sys

from crossattn_sd.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", *sys.argv[1:]], serve_prog="python app.py"))
