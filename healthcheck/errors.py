"""Envelope codes and the one exception tree.

Unhealthy is an answer, not an exception: exceptions mean a check could not be made
(docker failed), the input was refused, or the configuration is unusable.
"""

CODE_OK = 0
CODE_DOCKER_UNREACHABLE = 10
CODE_DOCKER_FAILED = 11
CODE_UNHEALTHY = 12
CODE_INVALID_INPUT = 13
CODE_NO_ROUTE = 14
CODE_FORBIDDEN = 15
CODE_INTERNAL = 16  # a bug in this service, answered 500: never "docker failed"
CODE_DRAINING = 17  # drained on purpose by an operator (planned maintenance), answered 503


class HealthcheckError(Exception):
    """Base of everything this package raises."""

    code = CODE_INTERNAL


class ConfigError(HealthcheckError):
    """A flag, env file or name pattern is unusable (at start, never in an answer)."""


class InvalidInput(HealthcheckError):
    """A client sent something we refuse to look up (answered 400)."""

    code = CODE_INVALID_INPUT


class DockerError(HealthcheckError):
    """We could not find out what Docker runs."""

    code = CODE_DOCKER_FAILED
    kind = "failed"


class DockerNotFound(DockerError):
    """The docker CLI is missing or not executable."""

    code = CODE_DOCKER_UNREACHABLE
    kind = "cli_missing"


class DockerUnreachable(DockerError):
    """The CLI ran but the daemon did not answer (stopped, wrong socket)."""

    code = CODE_DOCKER_UNREACHABLE
    kind = "unreachable"


class DockerTimeout(DockerError):
    """The CLI did not finish in time; it was killed with its process group."""

    kind = "timeout"


class DockerFailed(DockerError):
    """The CLI exited non-zero for another reason: returncode (negative: killed by that
    signal) and the start of its stderr, as fields as well as in the message."""

    kind = "failed"

    def __init__(self, message, returncode=None, stderr=""):
        DockerError.__init__(self, message)
        self.returncode = returncode
        self.stderr = stderr


class DockerOutputError(DockerError):
    """The CLI printed something that is not what we asked for."""

    kind = "output"
