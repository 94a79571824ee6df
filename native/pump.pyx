# cython: language_level=3
"""Native byte pump: an epoll loop that relays each pair of connected sockets without holding the GIL.

The pure-Python twin, the Protocol and the loader are in broker/_pump.py; both twins share one state
machine, so their closing semantics are the same:

* Direction d reads from fd[d] into a 64 KiB buffer and writes to fd[1 - d]. A side is read only while
  its buffer has room, and the other side is watched for EPOLLOUT only while bytes wait: a slow reader
  therefore stalls the writer in the kernel instead of growing the pump's memory.
* EOF on fd[d] (a shutdown(SHUT_WR) by that peer) is forwarded once the buffer is flushed, as
  shutdown(fd[1 - d], SHUT_WR). The agent (fd[0]) may half-close and still get its answers; once the
  daemon's EOF (fd[1]) has reached the agent the pair is closed, whether or not the agent ever closes.
* Any error on either socket (ECONNRESET, EPIPE, ...) closes both fds at once; buffered bytes are dropped.
* Bytes from the agent (fd[0]) are read with recvmsg and SO_PASSCRED: a read that another process than
  the pair's sender wrote, or that carries no credentials or anything besides them, closes the pair
  before a byte of it is relayed (why a read never mixes writers: broker/_pump.py).
* A closed pair is reported to on_close(pair_id, refused_writer) exactly once, on the pump thread, with the GIL held
  just for that call. Exceptions from on_close are swallowed without a word: the loop must survive a
  faulty callback, and the pump has no logger by design (native code does no I/O besides relaying).
"""

from cpython.exc cimport PyErr_SetFromErrno
from libc.errno cimport EAGAIN, EINTR, errno
from libc.stdint cimport uint32_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy, memset
from posix.fcntl cimport F_GETFD, F_GETFL, F_SETFD, F_SETFL, FD_CLOEXEC, O_NONBLOCK, fcntl
from posix.unistd cimport close, read, write

from pump cimport (
    CMSG_DATA, CMSG_FIRSTHDR, CMSG_LEN, CMSG_SPACE, EFD_CLOEXEC, EFD_NONBLOCK, EPOLL_CLOEXEC, EPOLL_CTL_ADD,
    EPOLL_CTL_DEL, EPOLL_CTL_MOD, EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, MSG_CMSG_CLOEXEC, MSG_CTRUNC,
    MSG_NOSIGNAL, SCM_CREDENTIALS, SHUT_WR, SO_PASSCRED, SO_TYPE, SOCK_STREAM, SOL_SOCKET, cmsghdr,
    epoll_create1, epoll_ctl, epoll_event, epoll_wait, eventfd, getsockopt, half_t, iovec, msghdr, pair_t,
    pthread_mutex_destroy, pthread_mutex_init, pthread_mutex_lock, pthread_mutex_t, pthread_mutex_unlock,
    recv, recvmsg, send, setsockopt, shutdown, socklen_t, ucred,
)

import threading

from broker.errors import BrokerError

# EWOULDBLOCK is EAGAIN on Linux, the only platform this module targets (epoll, eventfd).
cdef enum:
    BUF_SIZE = 65536
    MAX_EVENTS = 64
    # Wakeup events carry 0 in epoll data; pair events carry the pair's address with the side in bit 0,
    # which is free because malloc returns memory aligned to at least 8 bytes.
    SIDE_BIT = 1


cdef int _check_stream(int fd) except -1:
    """Refuse anything but a stream socket, as the pure twin's socket.socket(fileno=fd) does."""
    cdef int kind = 0
    cdef socklen_t size = sizeof(kind)
    if getsockopt(fd, SOL_SOCKET, SO_TYPE, &kind, &size) < 0:
        PyErr_SetFromErrno(OSError)
        return -1
    if kind != SOCK_STREAM:
        raise ValueError("the pump relays stream sockets only")
    return 0


cdef int _set_nonblocking_cloexec(int fd) noexcept nogil:
    """Make fd non-blocking (the loop must never sleep in recv/send) and close-on-exec (no child may
    inherit an agent's connection). Returns 0, or the errno of the failing call."""
    cdef int flags = fcntl(fd, F_GETFL)
    if flags < 0 or fcntl(fd, F_SETFL, flags | O_NONBLOCK) < 0:
        return errno
    flags = fcntl(fd, F_GETFD)
    if flags < 0 or fcntl(fd, F_SETFD, flags | FD_CLOEXEC) < 0:
        return errno
    return 0


cdef inline int _flush(pair_t *p, int d) noexcept nogil:
    """Write direction d's buffered bytes to fd[1 - d]; forward EOF once empty. 0 on success, -1 on error."""
    cdef half_t *h = &p.half[d]
    cdef ssize_t n
    while h.start < h.end:
        # MSG_NOSIGNAL: a vanished peer must surface as EPIPE here, not as a process-wide SIGPIPE.
        n = send(p.fd[1 - d], h.buf + h.start, h.end - h.start, MSG_NOSIGNAL)
        if n >= 0:
            h.start += <size_t>n
        elif errno == EINTR:
            continue
        elif errno == EAGAIN:
            return 0
        else:
            return -1
    # Rewind so the next read gets the whole buffer: a linear buffer is enough because a direction
    # stops reading only when it is full, and resumes as soon as it drains.
    h.start = 0
    h.end = 0
    if h.eof and not h.done:
        if shutdown(p.fd[1 - d], SHUT_WR) < 0:
            return -1
        h.done = True
    return 0


cdef inline int _fill(pair_t *p, int d) noexcept nogil:
    """Read once from fd[d] into direction d's buffer, then pass it on. 0 on success, -1 on error.

    One read per readiness event, not a drain to EAGAIN: epoll is level-triggered, so leftover bytes
    are reported again, and a small RPC costs one recv instead of two.
    """
    cdef half_t *h = &p.half[d]
    cdef ssize_t n
    while True:
        if d == 0:
            n = _recv_attested(p, h.buf + h.end, BUF_SIZE - h.end)
            if n == -2:
                # Another writer: closed like a broken socket, nothing of it relayed, and reported.
                p.refused_writer = True
                return -1
        else:
            n = recv(p.fd[1], h.buf + h.end, BUF_SIZE - h.end, 0)
        if n > 0:
            h.end += <size_t>n
            return _flush(p, d)
        if n == 0:
            h.eof = True
            return _flush(p, d)
        if errno == EINTR:
            continue
        if errno == EAGAIN:
            return 0
        return -1


cdef inline ssize_t _recv_attested(pair_t *p, char *into, size_t room) noexcept nogil:
    """One read from the agent (fd[0]): its length, 0 at EOF, -1 with errno set on an error, or -2 when
    the bytes were not all written by the pair's sender (or came with more than credentials)."""
    cdef iovec iov
    cdef msghdr msg
    # 8-byte aligned, as cmsghdr needs; the kernel is offered exactly CMSG_SPACE(sizeof(ucred)) of it,
    # room for the credentials alone, so passed descriptors never get installed in our process (the
    # kernel drops them and sets MSG_CTRUNC).
    cdef uint64_t control[8]
    cdef cmsghdr *c
    cdef ucred cred
    cdef ssize_t n
    iov.iov_base = into
    iov.iov_len = room
    memset(&msg, 0, sizeof(msg))
    msg.msg_iov = &iov
    msg.msg_iovlen = 1
    msg.msg_control = control
    msg.msg_controllen = CMSG_SPACE(sizeof(ucred))
    n = recvmsg(p.fd[0], &msg, MSG_CMSG_CLOEXEC)
    if n <= 0:
        return n  # EOF carries no credentials and no bytes: nothing to attribute
    # Fail closed: exactly one credentials message, nothing truncated, and the pinned pid.
    if msg.msg_flags & MSG_CTRUNC:
        return -2
    c = CMSG_FIRSTHDR(&msg)
    if c == NULL or c.cmsg_level != SOL_SOCKET or c.cmsg_type != SCM_CREDENTIALS:
        return -2
    if c.cmsg_len != CMSG_LEN(sizeof(ucred)):
        return -2
    memcpy(&cred, CMSG_DATA(c), sizeof(cred))
    if cred.pid != p.sender:
        return -2
    return n


cdef inline uint32_t _wanted(pair_t *p, int side) noexcept nogil:
    """The epoll interest fd[side] needs now: readable while its direction has room, writable while the
    opposite direction holds bytes for it."""
    cdef uint32_t want = 0
    if not p.half[side].eof and p.half[side].end < BUF_SIZE:
        want |= EPOLLIN
    if p.half[1 - side].start < p.half[1 - side].end:
        want |= EPOLLOUT
    return want


cdef void _free_pair(pair_t *p) noexcept nogil:
    # Both halves share one allocation, made in add().
    free(p.half[0].buf)
    free(p)


cdef class NativePump:
    """Relays bytes between the two sockets of each pair on one background thread, GIL released."""

    cdef int _epfd
    cdef int _evfd
    cdef pthread_mutex_t _lock
    cdef bint _lock_ready
    # Guarded by _lock: written by add()/stop() on caller threads and read by the loop thread.
    cdef pair_t *_pending
    cdef Py_ssize_t _active
    cdef bint _stopping
    # Owned by the loop thread alone once it runs.
    cdef pair_t *_open
    cdef pair_t *_closed
    cdef int _fatal_errno
    cdef object _on_close
    cdef object _thread


    def __cinit__(self, on_close):
        cdef epoll_event ev
        self._epfd = -1
        self._evfd = -1
        self._on_close = on_close
        if pthread_mutex_init(&self._lock, NULL) != 0:
            raise MemoryError("pthread_mutex_init failed")
        self._lock_ready = True
        self._epfd = epoll_create1(EPOLL_CLOEXEC)
        if self._epfd < 0:
            PyErr_SetFromErrno(OSError)
        self._evfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
        if self._evfd < 0:
            PyErr_SetFromErrno(OSError)
        ev.events = EPOLLIN
        ev.data.u64 = 0
        if epoll_ctl(self._epfd, EPOLL_CTL_ADD, self._evfd, &ev) < 0:
            PyErr_SetFromErrno(OSError)

    def __dealloc__(self):
        # Reached only when the pump was never started or was stopped: a running loop thread holds a
        # reference. Pairs still queued are closed silently; on_close cannot run safely from here.
        cdef pair_t *p
        while self._pending != NULL:
            p = self._pending
            self._pending = p.next
            close(p.fd[0])
            close(p.fd[1])
            _free_pair(p)
        self._close_fds()
        if self._lock_ready:
            pthread_mutex_destroy(&self._lock)

    @property
    def active(self):
        """Pairs added and not yet closed (queued ones included)."""
        cdef Py_ssize_t n
        with nogil:
            pthread_mutex_lock(&self._lock)
            n = self._active
            pthread_mutex_unlock(&self._lock)
        return n

    def start(self):
        """Start the loop thread. Raises BrokerError if already started or stopped."""
        if self._thread is not None or self._stopping:
            raise BrokerError("pump already started or stopped")
        # A daemon thread, so that a process exiting without stop() is not held up by the loop.
        self._thread = threading.Thread(target=self._run, name="broker-pump", daemon=True)
        self._thread.start()

    def _run(self):
        cdef int rc
        with nogil:
            rc = self._loop()
        if rc != 0:
            raise OSError(rc, "broker pump loop failed")

    def add(self, long long pair_id, int a, int b, long long sender):
        """Take ownership of the connected sockets a and b and relay between them; only bytes that
        process ``sender`` wrote to a are relayed.

        On any exception the fds stay the caller's to close. Raises BrokerError after stop().
        """
        cdef pair_t *p
        cdef bint stopped
        cdef int err = 0
        cdef int on = 1
        cdef uint64_t one = 1
        if a < 0 or b < 0 or a == b:
            raise ValueError("a and b must be two distinct open file descriptors")
        if not 0 < sender < 2**31:
            raise ValueError("sender must be a process id")
        # Both checked before either is touched, so a rejected pair leaves the caller's fds as they were.
        _check_stream(a)
        _check_stream(b)
        p = <pair_t *>calloc(1, sizeof(pair_t))
        if p == NULL:
            raise MemoryError()
        p.half[0].buf = <char *>malloc(2 * BUF_SIZE)
        if p.half[0].buf == NULL:
            free(p)
            raise MemoryError()
        p.half[1].buf = p.half[0].buf + BUF_SIZE
        p.pair_id = pair_id
        p.fd[0] = a
        p.fd[1] = b
        p.sender = <int>sender
        with nogil:
            pthread_mutex_lock(&self._lock)
            stopped = self._stopping
            # The fds are changed only once the pair is sure to be accepted (under the lock, so a
            # concurrent stop() cannot intervene): a refused pair leaves them exactly as they were.
            if not stopped:
                # SO_PASSCRED: the kernel names the writer of every read from the agent.
                if setsockopt(a, SOL_SOCKET, SO_PASSCRED, &on, sizeof(on)) < 0:
                    err = errno
                if err == 0:
                    err = _set_nonblocking_cloexec(a)
                if err == 0:
                    err = _set_nonblocking_cloexec(b)
            # Only the first pair queued since the loop last drained needs a wakeup; a burst of accepts
            # then costs one eventfd write. Writing under the lock also guarantees the eventfd is still
            # open: the loop closes it under the same lock, after _stopping is set.
            if not stopped and err == 0 and self._pending == NULL:
                if write(self._evfd, &one, sizeof(one)) < 0 and errno != EAGAIN:
                    # EAGAIN means the counter is saturated, so a wakeup is pending anyway.
                    err = errno
            if not stopped and err == 0:
                p.next = self._pending
                self._pending = p
                self._active += 1
            pthread_mutex_unlock(&self._lock)
        if stopped or err != 0:
            _free_pair(p)
            if stopped:
                raise BrokerError("pump is stopped")
            raise OSError(err, "cannot hand the pair to the broker pump")

    def stop(self):
        """Close every pair (on_close runs for each), then join the loop thread. Idempotent.

        Called from on_close (the pump thread) it only asks the loop to stop: a thread cannot join itself.
        Never started, it closes the queued pairs itself and runs on_close on the caller's thread.
        """
        cdef uint64_t one = 1
        cdef pair_t *p
        cdef bint first
        cdef bint started = self._thread is not None
        cdef int wake_errno = 0
        with nogil:
            pthread_mutex_lock(&self._lock)
            first = not self._stopping
            self._stopping = True
            # The loop may already have exited on a fatal error and closed the eventfd (under this lock).
            if first and started and self._evfd >= 0:
                if write(self._evfd, &one, sizeof(one)) < 0 and errno != EAGAIN:
                    wake_errno = errno
            pthread_mutex_unlock(&self._lock)
        if wake_errno != 0:
            raise OSError(wake_errno, "cannot wake the broker pump")
        if not started:
            if first:
                with nogil:
                    pthread_mutex_lock(&self._lock)
                    while self._pending != NULL:
                        p = self._pending
                        self._pending = p.next
                        p.next = self._closed
                        self._closed = p
                        close(p.fd[0])
                        close(p.fd[1])
                        self._active -= 1
                    self._close_fds()
                    pthread_mutex_unlock(&self._lock)
                    self._report_closed()
            return
        if self._thread is not threading.current_thread():
            self._thread.join()

    cdef int _loop(self) noexcept nogil:
        """Serve events until stop(); returns 0, or the errno that made the loop give up."""
        cdef epoll_event events[MAX_EVENTS]
        cdef int n, i, stop
        cdef bint woken
        cdef uint64_t tag
        cdef pair_t *p
        while True:
            n = epoll_wait(self._epfd, events, MAX_EVENTS, -1)
            if n < 0:
                if errno == EINTR:
                    continue
                self._fatal_errno = errno
                break
            woken = False
            for i in range(n):
                tag = events[i].data.u64
                if tag == 0:
                    woken = True
                    continue
                p = <pair_t *><uintptr_t>(tag & ~(<uint64_t>SIDE_BIT))
                # A pair closed earlier in this batch stays allocated until _report_closed(), so reading
                # its flag here is safe.
                if not p.closed:
                    self._service(p, <int>(tag & SIDE_BIT), events[i].events)
            stop = self._drain_wakeup() if woken else 0
            # After the wakeup too: a queued pair that epoll refused is closed there.
            self._report_closed()
            if stop:
                break
        # Stopping or failing: no pair survives the loop.
        pthread_mutex_lock(&self._lock)
        self._stopping = True
        pthread_mutex_unlock(&self._lock)
        self._drain_wakeup()
        self._close_all()
        pthread_mutex_lock(&self._lock)
        self._close_fds()
        pthread_mutex_unlock(&self._lock)
        self._report_closed()
        return self._fatal_errno

    cdef int _drain_wakeup(self) noexcept nogil:
        """Register the pairs queued by add(); returns 1 when stop() was requested."""
        cdef uint64_t counter
        cdef pair_t *queued
        cdef pair_t *p
        cdef int stop
        pthread_mutex_lock(&self._lock)
        # Resetting the counter under the lock keeps add()'s "wake only if the queue was empty" exact.
        # EAGAIN just means nobody wrote since the last drain.
        if read(self._evfd, &counter, sizeof(counter)) < 0 and errno != EAGAIN and errno != EINTR:
            self._fatal_errno = errno
        queued = self._pending
        self._pending = NULL
        stop = self._stopping or self._fatal_errno != 0
        pthread_mutex_unlock(&self._lock)
        while queued != NULL:
            p = queued
            queued = p.next
            p.prev = NULL
            p.next = self._open
            if self._open != NULL:
                self._open.prev = p
            self._open = p
            # EPERM (not a pollable file) or ENOMEM: this pair cannot be relayed, the others can.
            if self._rearm(p) != 0:
                self._close(p)
        return stop

    cdef void _service(self, pair_t *p, int side, uint32_t ready) noexcept nogil:
        """Act on readiness of fd[side]; closes the pair when it is finished or broken."""
        cdef int rc = 0
        cdef uint32_t interest = p.events[side]
        # HUP and ERR are reported whatever the interest: let the pending operation meet the condition,
        # so that an error becomes the same errno the pure twin sees.
        if (ready & (EPOLLOUT | EPOLLERR | EPOLLHUP)) and (interest & EPOLLOUT):
            rc = _flush(p, 1 - side)
        if rc == 0 and (ready & (EPOLLIN | EPOLLERR | EPOLLHUP)) and (interest & EPOLLIN):
            rc = _fill(p, side)
        if rc == 0 and not p.half[1].done:  # the daemon's EOF, delivered to the agent, ends the pair
            rc = self._rearm(p)
            if rc == 0:
                return
        self._close(p)

    cdef int _rearm(self, pair_t *p) noexcept nogil:
        """Bring each fd's epoll registration in line with what the pair needs now."""
        cdef epoll_event ev
        cdef uint32_t want
        cdef int side, op
        for side in range(2):
            want = _wanted(p, side)
            if want == p.events[side]:
                continue
            if want == 0:
                # Removed rather than left with an empty mask: epoll reports HUP and ERR regardless of
                # the mask, and a level-triggered HUP nobody acts on would spin the loop.
                op = EPOLL_CTL_DEL
            elif p.events[side] == 0:
                op = EPOLL_CTL_ADD
            else:
                op = EPOLL_CTL_MOD
            ev.events = want
            ev.data.u64 = <uint64_t><uintptr_t>p | <uint64_t>side
            if epoll_ctl(self._epfd, op, p.fd[side], &ev) < 0:
                return -1
            p.events[side] = want
        return 0

    cdef void _close(self, pair_t *p) noexcept nogil:
        """Close both fds now and queue the pair for reporting; memory is freed after the batch."""
        cdef int side
        for side in range(2):
            if p.events[side] != 0:
                # Deregister explicitly: if a forked child still shared the socket, close() alone would
                # leave the registration, and its events would point at freed memory. Failure leaves
                # nothing to undo.
                epoll_ctl(self._epfd, EPOLL_CTL_DEL, p.fd[side], NULL)
                p.events[side] = 0
            # The fd is released even when close() reports an error (Linux), so it is never retried.
            close(p.fd[side])
        p.closed = True
        if p.prev != NULL:
            p.prev.next = p.next
        else:
            self._open = p.next
        if p.next != NULL:
            p.next.prev = p.prev
        p.prev = NULL
        p.next = self._closed
        self._closed = p
        pthread_mutex_lock(&self._lock)
        self._active -= 1
        pthread_mutex_unlock(&self._lock)

    cdef void _close_all(self) noexcept nogil:
        while self._open != NULL:
            self._close(self._open)

    cdef void _report_closed(self) noexcept nogil:
        """Call on_close for each pair closed since the last report, under one GIL acquisition, then
        free them."""
        cdef pair_t *p
        cdef pair_t *closed = self._closed
        if closed == NULL:
            return
        self._closed = NULL
        with gil:
            p = closed
            while p != NULL:
                try:
                    self._on_close(p.pair_id, p.refused_writer)
                except BaseException:
                    # Documented: the callback's failures are its own; the loop keeps relaying.
                    pass
                p = p.next
        while closed != NULL:
            p = closed
            closed = p.next
            _free_pair(p)

    cdef void _close_fds(self) noexcept nogil:
        # After the loop has ended: nothing refers to the epoll set or the eventfd any more.
        if self._evfd >= 0:
            close(self._evfd)
            self._evfd = -1
        if self._epfd >= 0:
            close(self._epfd)
            self._epfd = -1
