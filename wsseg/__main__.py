"""`python -m wsseg ...` and `torchrun ... -m wsseg ...` run the CLI."""

import sys

from wsseg.cli.main import main

sys.exit(main())
