"""The direct data link: one TCP connection per node (TCP_NODELAY) for the per-layer Mlp/MlpOut.

The engine thread writes and reads it itself, so a layer's round trip costs what the wire costs:
no ZeroMQ I/O thread between the engine and the kernel. It carries the same wire frames as
ZeroMQ (wire.py), with a fixed prefix for the length of each:

    prefix = <u32 count><u32 header bytes><u32 tensor bytes>    little-endian, 12 bytes
    then the header frame, then the tensor frame (absent when count == 1; its length is 0)

count is 1 or 2 (only `data_hello`, `mlp` and `mlp_out` travel here), the header at most
wire.MAX_HEADER_BYTES and the tensor at most the receiver's frame cap, all checked before a byte
is allocated; the frames then go through `wire.decode` like any other. A connection whose
framing breaks, or that stalls mid-message past its deadline, cannot be resynchronised: it is
closed, and Mlp goes over ZeroMQ again.

The server learns who is on the other end from the first message, `data_hello(node_id, token)`:
see cluster.py for the token and docs/security.md for why.
"""
from __future__ import annotations

import select
import socket
import struct
import time

from . import wire

PREFIX = struct.Struct("<III")
MAX_HELLO_BYTES = 1024      # the whole first message of an unauthenticated connection
HELLO_TIMEOUT_S = 2.0       # to send it, from the accept
MAX_PENDING = 64            # connections waiting to say hello; more are closed at once
READ_CHUNK = 64 << 10      # a link's read buffer: the compiled loops (_link.c) take messages that fit in it
                            # (a 256-row prefill chunk of a 576- or 1024-wide model, decode rows of any)
SLEEP_SLACK_S = 60e-6       # how late time.sleep wakes up here with a 1 ns timer slack (30-45 µs)
PR_SET_TIMERSLACK = 29


class LinkError(ConnectionError):
    """The link is gone, timed out mid-message, or its framing cannot be trusted."""


class FramingError(LinkError):
    """The peer sent bytes that are not a data-link message: a bad message, and the end of the link."""


def parse_prefix(prefix: bytes, max_frame: int) -> tuple[int, int]:
    """(header bytes, tensor bytes) of a message, or LinkError."""
    count, head, body = PREFIX.unpack(prefix)
    if count not in (1, 2) or not 0 < head <= wire.MAX_HEADER_BYTES or body > max_frame \
            or (count == 1 and body):
        raise FramingError(f"bad frame prefix (count {count}, header {head}, tensor {body})")
    return head, body


def precise_timers() -> bool:
    """Ask Linux for a 1 ns timer slack in this process (default 50 µs), so that a sleep ends
    30-45 µs late instead of 80-120 on these VMs; False where it cannot be done."""
    try:
        import ctypes
        return ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def pause(seconds: float) -> None:
    """Wait `seconds` precisely (benchmarks' emulated delay): sleep while more than SLEEP_SLACK_S
    is left (a sleep overshoots by about that much, see precise_timers), then spin to the end:
    a few µs of CPU, not the whole delay."""
    end = time.perf_counter() + seconds
    if seconds > SLEEP_SLACK_S:
        time.sleep(seconds - SLEEP_SLACK_S)
    while time.perf_counter() < end:
        pass


def pack(frames: list) -> list:
    """Frames -> buffers to write: the prefix, then the frames themselves (no copy)."""
    if not 1 <= len(frames) <= 2:
        raise ValueError("a data-link message has a header and at most one tensor")
    lens = [memoryview(f).nbytes for f in frames]
    return [PREFIX.pack(len(frames), lens[0], lens[1] if len(lens) > 1 else 0), *frames]


class DataConn:
    """One end of a data link, over a blocking socket used with per-call timeouts. Reads are
    buffered: a small message usually costs one recv, and bytes of the next one are kept."""

    def __init__(self, sock: socket.socket, max_frame: int = wire.MAX_FRAME_BYTES, delay_s: float = 0.0):
        """delay_s (benchmarks): sleep that long after each message in and before each out, which
        on a request-reply link is an added one-way delay each way (2 delay_s per round trip)."""
        self.sock, self.max_frame, self.delay_s = sock, max_frame, delay_s
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._timeout = None
        self._set_timeout(5.0)
        self._buf = bytearray(READ_CHUNK)
        self._start = self._end = 0   # unread bytes are _buf[_start:_end]
        self._poll = select.poll()
        self._poll.register(sock, select.POLLIN)

    def fileno(self) -> int:
        return self.sock.fileno()

    def _set_timeout(self, timeout: float) -> None:
        if timeout != self._timeout:
            self.sock.settimeout(timeout)
            self._timeout = timeout

    def send_multipart(self, frames: list, copy: bool = False, timeout: float = 5.0) -> None:
        """Write one message: the prefix joined to the header, then the tensor, in one sendmsg
        when the kernel takes it all (it does for a decode row); LinkError if the peer is gone or
        does not read within timeout."""
        if self.delay_s:   # a benchmark's emulated one-way delay, the way out
            pause(self.delay_s)
        prefix = pack(frames)[0]
        bufs = [memoryview(prefix + bytes(frames[0]))]
        if len(frames) == 2 and memoryview(frames[1]).nbytes:
            bufs.append(memoryview(frames[1]).cast("B"))
        try:
            self._set_timeout(timeout)
            while bufs:
                sent = self.sock.sendmsg(bufs)
                while bufs and sent >= bufs[0].nbytes:
                    sent -= bufs[0].nbytes
                    bufs.pop(0)
                if bufs:
                    bufs[0] = bufs[0][sent:]
        except OSError as e:
            raise LinkError(f"send failed: {e}") from None

    def recv_multipart(self, timeout: float = 5.0) -> list:
        """Read one message: [header, tensor] or [header]; LinkError on EOF, timeout or bad framing."""
        try:
            self._set_timeout(timeout)
            count, head, body = self._prefix()
            msg = self._take(head + body)
        except LinkError:
            raise
        except OSError as e:   # socket.timeout included
            raise LinkError(f"receive failed: {e}") from None
        if self.delay_s:   # the emulated delay of the way in
            pause(self.delay_s)
        view = memoryview(msg)
        return [view[:head], view[head:]] if count == 2 else [view[:head]]

    def _prefix(self) -> tuple[int, int, int]:
        self._fill(PREFIX.size)
        count = PREFIX.unpack_from(self._buf, self._start)[0]
        head, body = parse_prefix(self._buf[self._start:self._start + PREFIX.size], self.max_frame)
        self._start += PREFIX.size
        return count, head, body

    def _take(self, n: int) -> bytearray:
        """The next n bytes, as a new buffer (what the caller keeps never aliases ours)."""
        have = min(n, self._end - self._start)
        out = bytearray(n)
        out[:have] = self._buf[self._start:self._start + have]
        self._start += have
        view = memoryview(out)[have:]
        while view.nbytes:
            got = self.sock.recv_into(view)
            if got == 0:
                raise LinkError("closed by the peer")
            view = view[got:]
        return out

    def _fill(self, n: int) -> None:
        """Buffer at least n bytes (n <= READ_CHUNK), reading whatever else has arrived too."""
        if self._end - self._start >= n:
            return
        if self._start:
            left = self._end - self._start
            self._buf[:left] = self._buf[self._start:self._end]
            self._start, self._end = 0, left
        while self._end < n:
            got = self.sock.recv_into(memoryview(self._buf)[self._end:])
            if got == 0:
                raise LinkError("closed by the peer")
            self._end += got

    def readable(self, timeout_s: float) -> bool:
        """A message (or EOF) can be read: buffered already, or the socket becomes readable
        within timeout_s. One poll() on this socket alone."""
        if self._end > self._start:
            return True
        return bool(self._poll.poll(int(timeout_s * 1000 + 0.999)))

    @property
    def buffered(self) -> bool:
        """Bytes of a next message already read from the socket: poll() on the fd will not
        say so, so check this before waiting."""
        return self._end > self._start

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def connect(host: str, port: int, hello: wire.DataHello, timeout: float = 5.0) -> DataConn:
    """Open a data link and introduce ourselves; LinkError (or OSError) if it cannot be done."""
    sock = socket.create_connection((host, port), timeout=timeout)
    conn = DataConn(sock)
    conn.send_multipart(wire.encode(hello), timeout=timeout)
    return conn


class DataListener:
    """The server's listening socket: accepts connections and collects each one's first message
    without ever blocking the engine thread; `poll()` hands back those that completed it."""

    def __init__(self, host: str, port: int = 0):
        self.sock = socket.create_server((host, port), backlog=64)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.pending: dict[socket.socket, tuple[bytearray, float]] = {}
        self.refused = 0   # connections closed before they said a complete, well-framed hello

    def fileno(self) -> int:
        return self.sock.fileno()

    def poll(self) -> list[tuple[socket.socket, list]]:
        """Accept what is waiting; (socket, hello frames) for each connection whose first
        message is complete. Garbage, oversized or slow hellos are closed and counted."""
        self._accept()
        done, now = [], time.monotonic()
        for s, (buf, t0) in list(self.pending.items()):
            try:
                frames = self._progress(s, buf)
            except (LinkError, OSError):
                frames = None
                self._refuse(s)
                continue
            if frames is not None:
                del self.pending[s]
                done.append((s, frames))
            elif now - t0 > HELLO_TIMEOUT_S:
                self._refuse(s)
        return done

    def _accept(self) -> None:
        while True:
            try:
                s, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(self.pending) >= MAX_PENDING:
                s.close()
                self.refused += 1
                continue
            s.setblocking(False)
            self.pending[s] = (bytearray(), time.monotonic())

    def _progress(self, s: socket.socket, buf: bytearray) -> list | None:
        """Read what has arrived of the first message; its frames once complete."""
        want = PREFIX.size
        if len(buf) >= PREFIX.size:
            head, body = parse_prefix(bytes(buf[:PREFIX.size]), MAX_HELLO_BYTES)
            want = PREFIX.size + head + body
            if want > MAX_HELLO_BYTES:
                raise LinkError("hello too large")
        while len(buf) < want:
            try:
                chunk = s.recv(want - len(buf))
            except (BlockingIOError, InterruptedError):
                return None
            if not chunk:
                raise LinkError("closed before its hello")
            buf += chunk
            if len(buf) == PREFIX.size:
                return self._progress(s, buf)
        head = PREFIX.unpack(buf[:PREFIX.size])[1]
        view = memoryview(bytes(buf[PREFIX.size:]))
        return [view[:head], view[head:]] if PREFIX.unpack(buf[:PREFIX.size])[0] == 2 else [view[:head]]

    def _refuse(self, s: socket.socket) -> None:
        self.pending.pop(s, None)
        self.refused += 1
        try:
            s.close()
        except OSError:
            pass

    def close(self) -> None:
        for s in list(self.pending):
            s.close()
        self.pending.clear()
        self.sock.close()
