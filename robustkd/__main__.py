"""``python -m robustkd ...`` (and ``accelerate launch -m robustkd ...``): the robustkd command line."""
import sys

from .cli import main

sys.exit(main())
