# cython: language_level=3
"""C-level header of the native pump: the system calls it uses and the layout of a pair's state.

Only declarations live here, so cimporting it needs no module at run time. The extension class itself is
declared in pump.pyx: Cython pairs a module with a .pxd by the module's dotted name
(broker._pump_native), which this file deliberately does not carry.
"""

from libc.stdint cimport uint32_t, uint64_t


cdef extern from "<sys/epoll.h>" nogil:
    ctypedef union epoll_data_t:
        void *ptr
        int fd
        uint32_t u32
        uint64_t u64

    struct epoll_event:
        uint32_t events
        epoll_data_t data

    enum:
        EPOLLIN
        EPOLLOUT
        EPOLLERR
        EPOLLHUP
        EPOLL_CTL_ADD
        EPOLL_CTL_MOD
        EPOLL_CTL_DEL
        EPOLL_CLOEXEC

    int epoll_create1(int flags)
    int epoll_ctl(int epfd, int op, int fd, epoll_event *event)
    int epoll_wait(int epfd, epoll_event *events, int maxevents, int timeout)


cdef extern from "<sys/eventfd.h>" nogil:
    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK

    int eventfd(unsigned int initval, int flags)


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t

    enum:
        SHUT_WR
        MSG_NOSIGNAL
        SOL_SOCKET
        SO_TYPE
        SOCK_STREAM

    int getsockopt(int fd, int level, int optname, void *optval, socklen_t *optlen)

    ssize_t recv(int fd, void *buf, size_t n, int flags)
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    int shutdown(int fd, int how)


cdef extern from "<pthread.h>" nogil:
    ctypedef struct pthread_mutex_t:
        pass

    int pthread_mutex_init(pthread_mutex_t *mutex, const void *attr)
    int pthread_mutex_destroy(pthread_mutex_t *mutex)
    int pthread_mutex_lock(pthread_mutex_t *mutex)
    int pthread_mutex_unlock(pthread_mutex_t *mutex)


# One direction of a pair: bytes read from fd[d] wait in buf[start:end] until written to fd[1 - d].
ctypedef struct half_t:
    char *buf
    size_t start
    size_t end
    bint eof   # the source sent EOF; nothing more will be read from it
    bint done  # EOF seen, every buffered byte written, and the destination shut down for writing


ctypedef struct pair_t:
    long long pair_id
    int fd[2]
    uint32_t events[2]  # interest currently registered in epoll for fd[i]; 0 means not registered
    half_t half[2]
    bint closed
    # A pair sits on exactly one list at a time: pending (queued by add), open, or closed-not-yet-reported.
    pair_t *prev
    pair_t *next
