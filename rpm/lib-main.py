"""Entry point when the launcher runs the bundled directory: its own copies come first."""
import sys

from healthcheck.cli import main

sys.exit(main())
