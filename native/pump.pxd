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
        MSG_CTRUNC
        MSG_CMSG_CLOEXEC
        SOL_SOCKET
        SO_TYPE
        SO_PASSCRED
        SCM_CREDENTIALS
        SOCK_STREAM

    struct iovec:
        void *iov_base
        size_t iov_len

    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags

    struct cmsghdr:
        size_t cmsg_len
        int cmsg_level
        int cmsg_type

    # Declared by <sys/socket.h> under _GNU_SOURCE, which Python.h (included first) defines.
    struct ucred:
        int pid
        unsigned int uid
        unsigned int gid

    cmsghdr *CMSG_FIRSTHDR(msghdr *msg)
    unsigned char *CMSG_DATA(cmsghdr *cmsg)
    size_t CMSG_SPACE(size_t length)
    size_t CMSG_LEN(size_t length)

    int getsockopt(int fd, int level, int optname, void *optval, socklen_t *optlen)
    int setsockopt(int fd, int level, int optname, const void *optval, socklen_t optlen)
    ssize_t recvmsg(int fd, msghdr *msg, int flags)

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
    int sender  # the only process whose bytes on fd[0] are relayed (see _fill_attested)
    uint32_t events[2]  # interest currently registered in epoll for fd[i]; 0 means not registered
    half_t half[2]
    bint closed
    bint refused_writer  # closed because another process than sender wrote on fd[0]
    # A pair sits on exactly one list at a time: pending (queued by add), open, or closed-not-yet-reported.
    pair_t *prev
    pair_t *next
