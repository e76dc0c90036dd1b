"""``python -m lavis_plugins.cli ...`` (what torchrun launches)."""
import sys

from lavis_plugins.cli import main

sys.exit(main())
