"""One HTTP/1.x answer read from bytes as they arrive: its status, then where it ends (pure).

The prober needs only the status, but a keep-alive connection can carry the next request only
once this answer's body is past. The body is skipped by Content-Length or chunked framing; an
answer whose end cannot be told (no framing, a body too long to be worth skipping, garbage
after the status line) is `finished` without `keep_alive`: the connection is closed instead.
"""

# What the status line must fit in, and the whole head.
MAX_STATUS_LINE = 8192
MAX_HEAD = 32768
# A longer body is not read: closing the connection is cheaper than skipping it.
MAX_SKIP = 65536

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _DONE = range(7)


class BadAnswer(Exception):
    """The bytes are not an HTTP answer (no status line): the words say how."""


class AnswerReader(object):
    """Reads one answer to a GET. feed(data) with each piece received, eof() when the peer
    closed; then:

    status: the final status (an int) once its line is in, else None;
    finished: no more bytes of this answer are wanted;
    keep_alive: the whole answer was read and the connection may carry another request.
    :raises BadAnswer: from feed/eof, while no status line has come.
    """

    __slots__ = ("status", "finished", "keep_alive", "_state", "_buffer", "_left", "_skipped", "_close")

    def __init__(self):
        self.status = None
        self.finished = False
        self.keep_alive = False
        self._state = _HEAD
        self._buffer = b""
        self._left = 0
        self._skipped = 0
        self._close = False

    def feed(self, data):
        """Take the next bytes received."""
        if self.finished:
            self._give_up()  # bytes after the end: this connection is not in step any more
            return
        self._buffer += data
        while self._buffer and not self.finished:
            if not self._step():
                return
        if self.finished and self._buffer:
            self._give_up()

    def eof(self):
        """The peer closed the connection."""
        if self.status is None:
            raise BadAnswer("connection closed before an HTTP status line")
        self.finished = True
        self.keep_alive = False

    def _step(self):
        """Consume what the buffer holds for the current state; False when more is needed."""
        if self._state == _HEAD:
            return self._read_head()
        if self._state == _LENGTH:
            taken = min(self._left, len(self._buffer))
            self._left -= taken
            self._buffer = self._buffer[taken:]
            if self._left == 0:
                self._end()
            return True
        if self._state == _CHUNK_DATA:
            taken = min(self._left, len(self._buffer))
            self._left -= taken
            self._buffer = self._buffer[taken:]
            if self._left == 0:
                self._state = _CHUNK_END
            return True
        if self._state == _CHUNK_END:
            return self._read_chunk_end()
        line = self._take_line()
        if line is None:
            return False
        if self._state == _CHUNK_SIZE:
            self._read_chunk_size(line)
        elif not line:  # the empty line after the trailer
            self._end()
        return True

    def _read_chunk_end(self):
        """The line end after a chunk's data, and nothing else."""
        for end in (b"\r\n", b"\n"):
            if self._buffer.startswith(end):
                self._buffer = self._buffer[len(end):]
                self._state = _CHUNK_SIZE
                return True
        if self._buffer == b"\r":
            return False
        self._give_up()
        return True

    def _take_line(self):
        """The next line without its end, or None until it is whole (too long: give up)."""
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) > MAX_STATUS_LINE:
                self._give_up()
            return None
        line, self._buffer = self._buffer[:end], self._buffer[end + 1:]
        return line.rstrip(b"\r")

    def _read_head(self):
        if self.status is None:
            self._check_status_line()
        end = self._buffer.find(b"\r\n\r\n")
        cut = 4
        if end < 0:
            end, cut = self._buffer.find(b"\n\n"), 2
        if end < 0:
            if len(self._buffer) > MAX_HEAD:
                self._give_up()
            return False
        head, self._buffer = self._buffer[:end], self._buffer[end + cut:]
        lines = head.split(b"\n")
        version, status = parse_status_line(lines[0])
        if 100 <= status < 200 and status != 101:
            self.status = None  # an interim answer: the final one follows
            return True
        self.status = status
        self._frame(version, status, parse_headers(lines[1:]))
        return True

    def _check_status_line(self):
        """Fail early on bytes that cannot start an HTTP answer, and take the status as soon
        as its line is in (the head may still be arriving)."""
        end = self._buffer.find(b"\n")
        if end < 0:
            if len(self._buffer) >= MAX_STATUS_LINE:
                raise BadAnswer("no HTTP status line in the first %d bytes" % MAX_STATUS_LINE)
            if not b"HTTP/".startswith(self._buffer[:5]):
                raise BadAnswer("not an HTTP answer: %.60r" % self._buffer)
            return
        status = parse_status_line(self._buffer[:end])[1]
        if not 100 <= status < 200:
            self.status = status

    def _frame(self, version, status, headers):
        """Decide from the head how the body ends."""
        connection = {token.strip() for token in headers.get(b"connection", b"").lower().split(b",")}
        if version == b"HTTP/1.0":
            self._close = b"keep-alive" not in connection
        else:
            self._close = b"close" in connection
        if status == 101:
            self._give_up()
            return
        if status in (204, 304):
            self._end()
            return
        coding = headers.get(b"transfer-encoding")
        if coding is not None:
            if coding.lower().split(b",")[-1].strip() == b"chunked":
                self._state = _CHUNK_SIZE
            else:
                self._give_up()  # the body runs until the connection closes
            return
        length = headers.get(b"content-length")
        if length is None or not length.strip().isdigit():
            self._give_up()
        elif int(length) > MAX_SKIP:
            self._give_up()
        elif int(length) == 0:
            self._end()
        else:
            self._state, self._left = _LENGTH, int(length)

    def _read_chunk_size(self, line):
        size = line.split(b";", 1)[0].strip()
        try:
            self._left = int(size, 16)
        except ValueError:
            self._give_up()
            return
        if self._left == 0:
            self._state = _TRAILER
            return
        self._skipped += self._left
        if self._skipped > MAX_SKIP:
            self._give_up()
        else:
            self._state = _CHUNK_DATA

    def _end(self):
        self._state = _DONE
        self.finished = True
        self.keep_alive = not self._close

    def _give_up(self):
        self._state = _DONE
        self.finished = True
        self.keep_alive = False
        self._buffer = b""


def parse_status_line(line):
    """(version, status) of a status line such as b"HTTP/1.1 200 OK".
    :raises BadAnswer: it is not one."""
    parts = line.decode("latin-1").strip().split(None, 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not (parts[1].isdigit() and len(parts[1]) == 3):
        raise BadAnswer("not an HTTP answer: %.60r" % line)
    return parts[0].encode("latin-1"), int(parts[1])


def parse_headers(lines):
    """{lower-case name: value} of header lines; a repeated Content-Length that disagrees is
    dropped (the end of the body cannot be told)."""
    headers = {}
    for line in lines:
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        name, value = name.strip().lower(), value.strip()
        if name == b"content-length" and name in headers and headers[name] != value:
            value = b"?"
        elif name in headers and name != b"content-length":
            value = headers[name] + b", " + value
        headers[name] = value
    return headers
