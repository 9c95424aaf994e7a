"""The answer reader: the status as soon as its line is in, and where the answer ends."""
import pytest

from healthcheck.http_answer import MAX_SKIP, MAX_STATUS_LINE, AnswerReader, BadAnswer, parse_status_line


def read(*pieces):
    reader = AnswerReader()
    for piece in pieces:
        reader.feed(piece)
    return reader


def whole_and_split(answer):
    """The answer at once, byte by byte, and cut in two at every point."""
    yield [answer]
    yield [answer[i:i + 1] for i in range(len(answer))]
    for cut in range(1, len(answer)):
        yield [answer[:cut], answer[cut:]]


# (answer, status, keep_alive): every one of them read whole.
WHOLE = [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n", 200, True),
    (b"HTTP/1.1 302 Found\r\nLocation: /login/\r\nContent-Length: 0\r\n\r\n", 302, True),
    (b"HTTP/1.1 502 Bad Gateway\r\nServer: nginx\r\nContent-Type: text/html\r\nContent-Length: 5\r\n"
     b"Connection: keep-alive\r\n\r\n<hr/>", 502, True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nabcd\r\n3;ext=1\r\nefg\r\n0\r\n\r\n", 200, True),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-Trailer: 1\r\n\r\n", 200, True),
    (b"HTTP/1.1 204 No Content\r\n\r\n", 204, True),
    (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 99\r\n\r\n", 304, True),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, True),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", 200, False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", 200, False),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: Keep-Alive\r\n\r\nok", 200, True),
    (b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok", 200, True),  # bare line ends
]


@pytest.mark.parametrize("answer,status,keep_alive", WHOLE)
def test_framed_answers_are_read_to_their_end_however_they_arrive(answer, status, keep_alive):
    for pieces in whole_and_split(answer):
        reader = read(*pieces)
        assert (reader.status, reader.finished, reader.keep_alive) == (status, True, keep_alive), pieces


# (answer, status): the end cannot be told, or is not worth reading: finished, not kept.
GIVEN_UP = [
    (b"HTTP/1.1 200 OK\r\n\r\nbody until close", 200),
    (b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (MAX_SKIP + 1), 200),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", 200),
    (b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\nok", 200),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n...", 200),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 200),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n" % (MAX_SKIP + 1), 200),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nokNOT-A-CRLF", 200),
    (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", 101),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok and then more", 200),  # out of step
]


@pytest.mark.parametrize("answer,status", GIVEN_UP)
def test_an_answer_whose_end_cannot_be_told_closes_the_connection(answer, status):
    reader = read(answer)
    assert (reader.status, reader.finished, reader.keep_alive) == (status, True, False)


def test_the_status_comes_with_its_line_before_the_rest_of_the_head():
    reader = read(b"HTTP/1.1 502 Bad Gateway\r\nServ")
    assert reader.status == 502 and not reader.finished
    reader.feed(b"er: nginx\r\nContent-Length: 0\r\n\r\n")
    assert reader.finished and reader.keep_alive


def test_a_body_waits_for_its_last_byte():
    reader = read(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc")
    assert reader.status == 200 and not reader.finished
    reader.feed(b"de")
    assert reader.finished and reader.keep_alive


def test_an_interim_answer_is_not_the_status():
    reader = read(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert reader.status is None and not reader.finished
    reader.feed(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")
    assert reader.status == 503 and reader.finished


def test_bytes_after_the_end_mean_the_connection_is_out_of_step():
    reader = read(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
    assert reader.keep_alive
    reader.feed(b"HTTP/1.1 200 OK\r\n")
    assert reader.finished and not reader.keep_alive


def test_a_close_after_the_status_ends_the_answer():
    reader = read(b"HTTP/1.1 200 OK\r\n\r\nsome body")
    reader.eof()
    assert reader.status == 200 and reader.finished and not reader.keep_alive
    reader = read(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort")
    reader.eof()
    assert reader.finished and not reader.keep_alive


@pytest.mark.parametrize("pieces,words", [
    ([], "connection closed before an HTTP status line"),
    ([b"HTTP/1.1 2"], "connection closed before an HTTP status line"),
])
def test_a_close_before_the_status_line_is_a_bad_answer(pieces, words):
    reader = read(*pieces)
    with pytest.raises(BadAnswer, match=words):
        reader.eof()


@pytest.mark.parametrize("pieces", [
    [b"SSH-2.0-OpenSSH_9.2\r\n"],
    [b"SSH-2"],  # told before the line is whole
    [b"HTTP/1.1 OK\r\n"],
    [b"HTTP/1.1 2000 OK\r\n"],
    [b"\x16\x03\x01\x02\x00"],  # a TLS hello
    [b"HTTP/1.1 " + b"2" * MAX_STATUS_LINE],
    [b"HTTP/1.1 200", b" OK" + b"x" * MAX_STATUS_LINE],
])
def test_what_is_not_an_http_answer_is_told_at_once(pieces):
    with pytest.raises(BadAnswer):
        read(*pieces)


@pytest.mark.parametrize("line,parsed", [
    (b"HTTP/1.1 200 OK", (b"HTTP/1.1", 200)),
    (b"HTTP/1.0 404", (b"HTTP/1.0", 404)),
    (b"HTTP/1.1 502 Bad Gateway\r", (b"HTTP/1.1", 502)),
])
def test_status_lines(line, parsed):
    assert parse_status_line(line) == parsed
