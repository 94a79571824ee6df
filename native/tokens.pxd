# cython: language_level=3
"""C-level header of the native token engine (built as broker.tokens._native).

Declarations only, so cimporting it needs nothing at run time. Like pump.pxd it is paired with its .pyx
by an explicit ``cimport`` rather than by the module's dotted name.
"""

from libc.stdint cimport uint8_t


# A growable byte buffer for the encoder; owned by one call, freed on every path out of it.
ctypedef struct buf_t:
    uint8_t *data
    Py_ssize_t len
    Py_ssize_t cap


# The JSON parser's position in a borrowed input: [p, end) is what is left to read.
ctypedef struct cursor_t:
    const uint8_t *p
    const uint8_t *end
    int depth  # containers currently open; bounded by MAX_JSON_DEPTH
