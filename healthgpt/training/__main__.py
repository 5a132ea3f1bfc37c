"""``python -m healthgpt.training --stage ...`` (what torchrun / accelerate launch run)."""

import sys

from healthgpt.training.run import main

sys.exit(main())
