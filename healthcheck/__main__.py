"""Allows `python -m healthcheck`."""
import sys

from healthcheck.cli import main

sys.exit(main())
