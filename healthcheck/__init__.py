"""container-healthcheck: tells a load balancer whether an app's Docker container is healthy."""
import logging

__version__ = "2.4.2"

logging.getLogger(__name__).addHandler(logging.NullHandler())
