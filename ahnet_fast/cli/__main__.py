"""`python -m ahnet_fast.cli ...` (what torchrun launches)."""
import sys

from ahnet_fast.cli import main

sys.exit(main())
