"""The docker CLI as a subprocess: argv lists, a deadline, bounded output, no leftovers."""
import os
import selectors
import signal
import subprocess
import time

from healthcheck import errors
from healthcheck.parsing import parse_ps_output

# Per-field template: `{{json .}}` makes 20.10+ clients ask dockerd for every container's
# disk size, and `.State` does not exist before 20.10, so neither is referenced.
PS_TEMPLATE = ('{"ID":{{json .ID}},"Names":{{json .Names}},"Image":{{json .Image}},'
               '"Command":{{json .Command}},"CreatedAt":{{json .CreatedAt}},'
               '"Status":{{json .Status}},"Ports":{{json .Ports}}}')
PS_ARGS = ("ps", "-a", "--no-trunc", "--format", PS_TEMPLATE)
EVENTS_FORMAT = "{{json .}}"
MAX_OUTPUT_BYTES = 256 * 1024 * 1024
_UNREACHABLE_HINTS = (
    "cannot connect to the docker daemon",
    "is the docker daemon running",
    "error during connect",
    "connection refused",
    "no such file or directory",
    "permission denied while trying to connect",
    "dial unix",
)


class DockerCLI(object):
    """Runs the docker binary. Every call has a deadline; on timeout the child's whole
    process group is killed (wrappers spawn children) and reaped.

    observe: optional callable(command, seconds, error_or_None), for metrics.
    """

    def __init__(self, binary="docker", timeout_s=5.0, env=None, observe=None,
                 max_output_bytes=MAX_OUTPUT_BYTES):
        self.binary = binary
        self.timeout_s = timeout_s
        # LC_ALL=C: docker's Status text is parsed, so it must not be translated.
        self.env = dict(env if env is not None else os.environ, LC_ALL="C")
        self._observe = observe
        self._max_output_bytes = max_output_bytes

    def argv(self, args):
        return [self.binary] + list(args)

    def list_containers(self):
        """:rtype: list of Container (all states)
        :raises DockerError: with the kind of failure."""
        return parse_ps_output(self.run(PS_ARGS, command="ps"))

    def events_argv(self, since_unix):
        return self.argv(["events", "--format", EVENTS_FORMAT, "--filter", "type=container",
                          "--since", str(int(since_unix))])

    def spawn(self, argv, **kwargs):
        """Start a child in its own process group, so a kill reaches what it spawned.
        :raises DockerNotFound: the binary is missing or not executable."""
        try:
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=self.env,
                                    start_new_session=True, **kwargs)
        except OSError as exc:
            raise errors.DockerNotFound("cannot run %s: %s" % (self.binary, exc.strerror or exc))

    def run(self, args, command=None):
        """Run `docker <args>` and return its stdout as text.
        :raises DockerError: DockerNotFound, DockerUnreachable, DockerTimeout, DockerFailed,
            DockerOutputError."""
        command = command or args[0]
        started = time.monotonic()
        error = None
        try:
            return self._run(self.argv(args))
        except errors.DockerError as exc:
            error = exc
            raise
        finally:
            if self._observe is not None:
                self._observe(command, time.monotonic() - started, error)

    def _run(self, argv):
        proc = self.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            stdout, stderr = _read_until_exit(proc, self.timeout_s, self._max_output_bytes)
        except _Timeout:
            kill_group(proc)
            raise errors.DockerTimeout("%s did not finish within %gs; killed" % (" ".join(argv[:2]), self.timeout_s))
        except _TooBig:
            kill_group(proc)
            raise errors.DockerOutputError("%s printed more than %d bytes; killed" % (
                " ".join(argv[:2]), self._max_output_bytes))
        finally:
            for pipe in (proc.stdout, proc.stderr):
                pipe.close()
        text = stdout.decode("utf-8", "replace")
        if proc.returncode != 0:
            message = stderr.decode("utf-8", "replace").strip()[:500] or "no error text"
            if proc.returncode < 0:
                message = "killed by signal %d; %s" % (-proc.returncode, message)
            lowered = message.lower()
            if any(hint in lowered for hint in _UNREACHABLE_HINTS):
                raise errors.DockerUnreachable("docker daemon unreachable: %s" % message)
            raise errors.DockerFailed("%s exited %d: %s" % (" ".join(argv[:2]), proc.returncode, message),
                                      proc.returncode, message)
        return text


class _Timeout(Exception):
    pass


class _TooBig(Exception):
    pass


def _read_until_exit(proc, timeout_s, max_bytes):
    """Read both pipes to EOF and reap the child, all within timeout_s and max_bytes."""
    deadline = time.monotonic() + timeout_s
    chunks = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
    total = 0
    with selectors.DefaultSelector() as selector:
        for pipe in (proc.stdout, proc.stderr):
            selector.register(pipe.fileno(), selectors.EVENT_READ)
        while selector.get_map():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Timeout()
            for key, _ in selector.select(remaining):
                data = os.read(key.fd, 1 << 16)
                if not data:
                    selector.unregister(key.fd)
                    continue
                chunks[key.fd].append(data)
                total += len(data)
                if total > max_bytes:
                    raise _TooBig()
    try:
        proc.wait(max(deadline - time.monotonic(), 0.001))
    except subprocess.TimeoutExpired:
        raise _Timeout()
    return b"".join(chunks[proc.stdout.fileno()]), b"".join(chunks[proc.stderr.fileno()])


def kill_group(proc):
    """SIGKILL the child's process group and reap the child."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        proc.kill()
    except OSError:
        pass
    proc.wait()
