"""``python -m healthgpt.training --stage ...`` (what torchrun / accelerate launch run): ``healthgpt train``."""

import sys

from healthgpt.cli.train import main

sys.exit(main())
