"""``python -m healthgpt.training --stage ...`` (what torchrun / accelerate launch run)."""

import sys

from .run import main

sys.exit(main())
