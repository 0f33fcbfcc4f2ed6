"""``python -m rayfleet_runtime.controller``: start (or find) the controller, exit once its API answers."""
import sys

from rayfleet_runtime.controller.actor import main

sys.exit(main())
