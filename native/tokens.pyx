# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Native token engine (broker.tokens._native): JWS compact framing, strict JSON, claim checks.

The twin of broker/tokens/_pure.py: the same functions, byte-identical output, the same inputs accepted
and refused, the same reasons. Base64url, the JSON encoder and parser, the claim checks and the HMAC tag
comparison are done here in C; the signature primitives stay with vetted code (``cryptography`` for
ES256 and Ed25519, OpenSSL's HMAC through ``hmac.digest``). Bytes in, bytes out: no I/O, no logging, no
clock (``now`` is a parameter), no randomness.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_Contains, PyDict_GetItem, PyDict_SetItem
from cpython.long cimport PyLong_AsLongLongAndOverflow, PyLong_CheckExact, PyLong_FromLongLong
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint8_t, uint32_t
from libc.string cimport memchr, memcmp, memcpy

cimport cython


cdef extern from "Python.h":
    bint PyUnicode_IS_COMPACT_ASCII(object o)
    void *PyUnicode_DATA(object o)
    int PyObject_GenericSetAttr(object o, object name, object value) except -1
    str PyUnicode_New(Py_ssize_t size, Py_UCS4 maxchar)
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member
    ctypedef struct PyTypeObject:
        PyObject *(*tp_alloc)(PyTypeObject *, Py_ssize_t)
    void Py_INCREF(PyObject *o)
    void Py_XDECREF(PyObject *o)

cdef extern from "structmember.h":
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset
        int flags
    int T_OBJECT_EX
    int READONLY

from tokens cimport buf_t, cursor_t

import hashlib
import hmac

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from broker.errors import BrokerError, InvalidToken
from broker.tokens._claims import HEADER_KEYS, MAX_JSON_DEPTH, MAX_TOKEN_BYTES, Claims, Expect
from broker.tokens._keys import EDDSA, ES256, HS256, VerifyKey

# Bound once: a module-global lookup per call is measurable on the HS256 path.
cdef object _ECDSA = ec.ECDSA(hashes.SHA256())
cdef object _hmac_digest = hmac.digest
cdef object _sha256 = hashlib.sha256
cdef object _Claims = Claims
cdef object _Expect = Expect
cdef object _VerifyKey = VerifyKey
cdef object _InvalidSignature = InvalidSignature
cdef object _HEADER_KEYS = HEADER_KEYS
cdef str _ES256 = ES256
cdef str _EDDSA = EDDSA
cdef str _HS256 = HS256
cdef Py_ssize_t _MAX_TOKEN = MAX_TOKEN_BYTES
cdef int _MAX_DEPTH = MAX_JSON_DEPTH
cdef tuple _TYPS = ("JWT", "JOSE")

__all__ = ["VerifiedCache", "b64decode", "b64encode", "check_claims", "mint", "parse_claims", "parse_json",
           "sign_compact", "verify", "verify_signature"]


# ---------------------------------------------------------------------------------------------------------
# Byte buffer

cdef int buf_init(buf_t *b, Py_ssize_t cap) except -1:
    b.data = <uint8_t *>PyMem_Malloc(cap)
    if b.data == NULL:
        raise MemoryError()
    b.len = 0
    b.cap = cap
    return 0


cdef int buf_reserve(buf_t *b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t cap = b.cap
    cdef uint8_t *data
    if b.len + extra <= cap:
        return 0
    while cap < b.len + extra:
        cap *= 2
    data = <uint8_t *>PyMem_Realloc(b.data, cap)
    if data == NULL:
        raise MemoryError()
    b.data = data
    b.cap = cap
    return 0


cdef inline int buf_put(buf_t *b, const void *src, Py_ssize_t n) except -1:
    buf_reserve(b, n)
    memcpy(b.data + b.len, src, n)
    b.len += n
    return 0


cdef inline int buf_byte(buf_t *b, uint8_t c) except -1:
    buf_reserve(b, 1)
    b.data[b.len] = c
    b.len += 1
    return 0


# ---------------------------------------------------------------------------------------------------------
# Base64url (RFC 4648 section 5, unpadded, canonical)

cdef const char *_B64 = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
cdef uint8_t _B64REV[256]


cdef void _init_b64rev():
    cdef int i
    for i in range(256):
        _B64REV[i] = 0xFF
    for i in range(64):
        _B64REV[<uint8_t>_B64[i]] = <uint8_t>i


_init_b64rev()


cdef inline Py_ssize_t b64_len(Py_ssize_t n):
    return (n // 3) * 4 + (0, 2, 3)[n % 3]


cdef void b64_encode_into(const uint8_t *src, Py_ssize_t n, uint8_t *dst):
    cdef Py_ssize_t i = 0
    cdef uint32_t v
    while i + 3 <= n:
        v = (<uint32_t>src[i] << 16) | (<uint32_t>src[i + 1] << 8) | src[i + 2]
        dst[0] = _B64[(v >> 18) & 63]
        dst[1] = _B64[(v >> 12) & 63]
        dst[2] = _B64[(v >> 6) & 63]
        dst[3] = _B64[v & 63]
        dst += 4
        i += 3
    if n - i == 1:
        v = <uint32_t>src[i] << 16
        dst[0] = _B64[(v >> 18) & 63]
        dst[1] = _B64[(v >> 12) & 63]
    elif n - i == 2:
        v = (<uint32_t>src[i] << 16) | (<uint32_t>src[i + 1] << 8)
        dst[0] = _B64[(v >> 18) & 63]
        dst[1] = _B64[(v >> 12) & 63]
        dst[2] = _B64[(v >> 6) & 63]


cdef Py_ssize_t b64_decode_into(const uint8_t *src, Py_ssize_t n, uint8_t *dst) noexcept:
    """Decode into dst (room for n * 3 // 4 bytes); -1 unless src is canonical unpadded base64url."""
    cdef Py_ssize_t i = 0, o = 0
    cdef uint32_t a, b, c, d
    if n % 4 == 1:
        return -1
    while i + 4 <= n:
        a = _B64REV[src[i]]
        b = _B64REV[src[i + 1]]
        c = _B64REV[src[i + 2]]
        d = _B64REV[src[i + 3]]
        if (a | b | c | d) & 0x80:
            return -1
        a = (a << 18) | (b << 12) | (c << 6) | d
        dst[o] = <uint8_t>(a >> 16)
        dst[o + 1] = <uint8_t>(a >> 8)
        dst[o + 2] = <uint8_t>a
        o += 3
        i += 4
    if n - i == 2:
        a = _B64REV[src[i]]
        b = _B64REV[src[i + 1]]
        # The bits past the last whole byte must be zero, else two texts would decode to one token.
        if (a | b) & 0x80 or b & 0x0F:
            return -1
        dst[o] = <uint8_t>((a << 2) | (b >> 4))
        o += 1
    elif n - i == 3:
        a = _B64REV[src[i]]
        b = _B64REV[src[i + 1]]
        c = _B64REV[src[i + 2]]
        if (a | b | c) & 0x80 or c & 0x03:
            return -1
        a = (a << 18) | (b << 12) | (c << 6)
        dst[o] = <uint8_t>(a >> 16)
        dst[o + 1] = <uint8_t>(a >> 8)
        o += 2
    return o


cdef bytes _b64decode(const uint8_t *src, Py_ssize_t n):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, (n * 3) // 4)
    cdef Py_ssize_t m = b64_decode_into(src, n, <uint8_t *>PyBytes_AS_STRING(out))
    if m < 0:
        raise InvalidToken("non-canonical base64url")
    if m == PyBytes_GET_SIZE(out):
        return out
    return out[:m]


def b64encode(const uint8_t[::1] data not None):
    cdef Py_ssize_t n = data.shape[0]
    cdef bytes out = PyBytes_FromStringAndSize(NULL, b64_len(n))
    if n:
        b64_encode_into(&data[0], n, <uint8_t *>PyBytes_AS_STRING(out))
    return out


def b64decode(bytes seg not None):
    """Strict base64url: no padding, no whitespace, no non-alphabet bytes, zero trailing bits."""
    return _b64decode(<const uint8_t *>PyBytes_AS_STRING(seg), PyBytes_GET_SIZE(seg))


# ---------------------------------------------------------------------------------------------------------
# JSON encoder: the exact bytes of json.dumps(obj, separators=(",", ":"), ensure_ascii=True)

cdef const char *_HEX = b"0123456789abcdef"


cdef inline int _put_u_escape(buf_t *b, uint32_t cp) except -1:
    cdef uint8_t esc[6]
    esc[0] = b'\\'
    esc[1] = b'u'
    esc[2] = _HEX[(cp >> 12) & 15]
    esc[3] = _HEX[(cp >> 8) & 15]
    esc[4] = _HEX[(cp >> 4) & 15]
    esc[5] = _HEX[cp & 15]
    return buf_put(b, esc, 6)


cdef int enc_str(buf_t *b, str s) except -1:
    cdef Py_ssize_t i, n = len(s)
    cdef Py_UCS4 ch
    cdef uint32_t cp
    buf_byte(b, b'"')
    # The common case: a plain ASCII str stores its text as bytes, which can be copied when no byte
    # needs an escape.
    if PyUnicode_IS_COMPACT_ASCII(s) and not _needs_escape(<const uint8_t *>PyUnicode_DATA(s), n):
        buf_put(b, PyUnicode_DATA(s), n)
        return buf_byte(b, b'"')
    for i in range(n):
        ch = s[i]
        if ch == u'"':
            buf_put(b, b'\\"', 2)
        elif ch == u'\\':
            buf_put(b, b'\\\\', 2)
        elif ch == u'\n':
            buf_put(b, b'\\n', 2)
        elif ch == u'\r':
            buf_put(b, b'\\r', 2)
        elif ch == u'\t':
            buf_put(b, b'\\t', 2)
        elif ch == u'\b':
            buf_put(b, b'\\b', 2)
        elif ch == u'\f':
            buf_put(b, b'\\f', 2)
        elif ch < 0x20 or ch >= 0x7F:
            cp = <uint32_t>ch
            if cp >= 0x10000:
                # Outside the BMP: a UTF-16 surrogate pair, as json.dumps writes it.
                cp -= 0x10000
                _put_u_escape(b, 0xD800 | ((cp >> 10) & 0x3FF))
                _put_u_escape(b, 0xDC00 | (cp & 0x3FF))
            else:
                _put_u_escape(b, cp)
        else:
            buf_byte(b, <uint8_t>ch)
    buf_byte(b, b'"')
    return 0


cdef bint _needs_escape(const uint8_t *s, Py_ssize_t n) noexcept:
    cdef Py_ssize_t i
    for i in range(n):
        if s[i] < 0x20 or s[i] >= 0x7F or s[i] == b'"' or s[i] == b'\\':
            return True
    return False


cdef int enc_int(buf_t *b, object v) except -1:
    cdef char tmp[24]
    cdef int64_t x
    cdef unsigned long long u
    cdef int k = 24
    cdef bytes text
    if -(1 << 62) < v < (1 << 62):
        x = v
        u = <unsigned long long>(-x if x < 0 else x)
        while True:
            k -= 1
            tmp[k] = <char>(48 + u % 10)
            u //= 10
            if u == 0:
                break
        if x < 0:
            k -= 1
            tmp[k] = b'-'
        return buf_put(b, tmp + k, 24 - k)
    text = int.__repr__(v).encode("ascii")
    return buf_put(b, PyBytes_AS_STRING(text), len(text))


cdef int enc_str_list(buf_t *b, object seq) except -1:
    cdef Py_ssize_t i
    buf_byte(b, b'[')
    for i in range(len(seq)):
        if i:
            buf_byte(b, b',')
        enc_str(b, seq[i])
    buf_byte(b, b']')
    return 0


cdef inline bint _is_int(object v):
    return isinstance(v, int) and not isinstance(v, bool)


cdef inline bint _is_str_seq(object v):
    cdef object x
    if not isinstance(v, (tuple, list)):
        return False
    for x in v:
        if not isinstance(x, str):
            return False
    return True


cdef str _mint_problem(object c):
    # Same checks, order and words as _pure._mint_problem; unrolled, as attribute reads by literal name
    # cost a fraction of getattr() with a name from a loop.
    if not isinstance(c.iss, str):
        return "claim iss must be a string"
    if not isinstance(c.sub, str):
        return "claim sub must be a string"
    if not isinstance(c.jti, str):
        return "claim jti must be a string"
    if not isinstance(c.tenant, str):
        return "claim tenant must be a string"
    if not isinstance(c.wf, str):
        return "claim wf must be a string"
    if not _is_int(c.iat):
        return "claim iat must be an integer"
    if not _is_int(c.nbf):
        return "claim nbf must be an integer"
    if not _is_int(c.exp):
        return "claim exp must be an integer"
    aud = c.aud
    if not _is_str_seq(aud) or not aud:
        return "claim aud must be a non-empty sequence of strings"
    tool = c.tool
    if tool is not None:
        if not isinstance(tool, str):
            return "claim tool must be a string or None"
        if not _is_str_seq(c.act):
            return "claim act must be a sequence of strings"
        if not _is_str_seq(c.dst):
            return "claim dst must be a sequence of strings"
    return None


cdef str _mint_problem_v(object iss, object sub, object aud, object iat, object nbf, object exp, object jti,
                        object tenant, object wf, object tool, object act, object dst):
    # _mint_problem on values already read (from the slots of an exact Claims).
    if not isinstance(iss, str):
        return "claim iss must be a string"
    if not isinstance(sub, str):
        return "claim sub must be a string"
    if not isinstance(jti, str):
        return "claim jti must be a string"
    if not isinstance(tenant, str):
        return "claim tenant must be a string"
    if not isinstance(wf, str):
        return "claim wf must be a string"
    if not _is_int(iat):
        return "claim iat must be an integer"
    if not _is_int(nbf):
        return "claim nbf must be an integer"
    if not _is_int(exp):
        return "claim exp must be an integer"
    if not _is_str_seq(aud) or not aud:
        return "claim aud must be a non-empty sequence of strings"
    if tool is not None:
        if not isinstance(tool, str):
            return "claim tool must be a string or None"
        if not _is_str_seq(act):
            return "claim act must be a sequence of strings"
        if not _is_str_seq(dst):
            return "claim dst must be a sequence of strings"
    return None


cdef int enc_claims(buf_t *b, object c) except -1:
    cdef object tool = c.tool
    return enc_claims_v(b, c.iss, c.sub, c.aud, c.iat, c.nbf, c.exp, c.jti, c.tenant, c.wf, tool,
                        c.act if tool is not None else (), c.dst if tool is not None else ())


cdef int enc_claims_v(buf_t *b, object iss, object sub, object aud, object iat, object nbf, object exp,
                      object jti, object tenant, object wf, object tool, object act, object dst) except -1:
    # Key order of Claims.to_json_dict, which the pure engine serialises with json.dumps.
    buf_put(b, b'{"iss":', 7)
    enc_str(b, iss)
    buf_put(b, b',"sub":', 7)
    enc_str(b, sub)
    buf_put(b, b',"aud":', 7)
    if len(aud) == 1:
        enc_str(b, aud[0])
    else:
        enc_str_list(b, aud)
    buf_put(b, b',"iat":', 7)
    enc_int(b, iat)
    buf_put(b, b',"nbf":', 7)
    enc_int(b, nbf)
    buf_put(b, b',"exp":', 7)
    enc_int(b, exp)
    buf_put(b, b',"jti":', 7)
    enc_str(b, jti)
    buf_put(b, b',"tenant":', 10)
    enc_str(b, tenant)
    buf_put(b, b',"wf":', 6)
    enc_str(b, wf)
    if tool is not None:
        buf_put(b, b',"tool":', 8)
        enc_str(b, tool)
        buf_put(b, b',"act":', 7)
        enc_str_list(b, act)
        buf_put(b, b',"dst":', 7)
        enc_str_list(b, dst)
    buf_byte(b, b'}')
    return 0


# ---------------------------------------------------------------------------------------------------------
# JSON parser: strict RFC 8259, accepting exactly what _pure.parse_json accepts

cdef inline void skip_ws(cursor_t *c) noexcept:
    while c.p < c.end and (c.p[0] == b' ' or c.p[0] == b'\t' or c.p[0] == b'\n' or c.p[0] == b'\r'):
        c.p += 1


cdef inline int _hex4(const uint8_t *p) noexcept:
    cdef int i, v = 0, d
    for i in range(4):
        d = p[i]
        if 48 <= d <= 57:
            d -= 48
        elif 97 <= d <= 102:
            d -= 87
        elif 65 <= d <= 70:
            d -= 55
        else:
            return -1
        v = (v << 4) | d
    return v


cdef int _put_utf8(buf_t *b, uint32_t cp) except -1:
    cdef uint8_t t[4]
    if cp < 0x80:
        return buf_byte(b, <uint8_t>cp)
    if cp < 0x800:
        t[0] = 0xC0 | (cp >> 6)
        t[1] = 0x80 | (cp & 0x3F)
        return buf_put(b, t, 2)
    if cp < 0x10000:
        t[0] = 0xE0 | (cp >> 12)
        t[1] = 0x80 | ((cp >> 6) & 0x3F)
        t[2] = 0x80 | (cp & 0x3F)
        return buf_put(b, t, 3)
    t[0] = 0xF0 | (cp >> 18)
    t[1] = 0x80 | ((cp >> 12) & 0x3F)
    t[2] = 0x80 | ((cp >> 6) & 0x3F)
    t[3] = 0x80 | (cp & 0x3F)
    return buf_put(b, t, 4)


cdef str _utf8(const uint8_t *p, Py_ssize_t n):
    try:
        return PyUnicode_DecodeUTF8(<const char *>p, n, "strict")
    except UnicodeDecodeError:
        raise InvalidToken("malformed JSON") from None


cdef str j_string_escaped(cursor_t *c, const uint8_t *start):
    # The slow path: at least one backslash. Unescape into UTF-8, then decode (which validates raw bytes).
    cdef buf_t b
    cdef const uint8_t *p = start
    cdef uint8_t ch
    cdef int cp, lo
    buf_init(&b, (c.end - start) + 4)
    try:
        while True:
            if p >= c.end:
                raise InvalidToken("malformed JSON")
            ch = p[0]
            if ch == b'"':
                break
            if ch < 0x20:
                raise InvalidToken("malformed JSON")
            if ch != b'\\':
                buf_byte(&b, ch)
                p += 1
                continue
            if p + 1 >= c.end:
                raise InvalidToken("malformed JSON")
            ch = p[1]
            p += 2
            if ch == b'"' or ch == b'\\' or ch == b'/':
                buf_byte(&b, ch)
            elif ch == b'b':
                buf_byte(&b, 8)
            elif ch == b'f':
                buf_byte(&b, 12)
            elif ch == b'n':
                buf_byte(&b, 10)
            elif ch == b'r':
                buf_byte(&b, 13)
            elif ch == b't':
                buf_byte(&b, 9)
            elif ch == b'u':
                cp = _hex4(p) if c.end - p >= 4 else -1
                if cp < 0:
                    raise InvalidToken("malformed JSON")
                p += 4
                if 0xD800 <= cp <= 0xDBFF:
                    lo = _hex4(p + 2) if c.end - p >= 6 and p[0] == b'\\' and p[1] == b'u' else -1
                    if not 0xDC00 <= lo <= 0xDFFF:
                        # A lone surrogate cannot be written as UTF-8 (the audit log): refused.
                        raise InvalidToken("malformed JSON")
                    p += 6
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00)
                elif 0xDC00 <= cp <= 0xDFFF:
                    raise InvalidToken("malformed JSON")
                _put_utf8(&b, cp)
            else:
                raise InvalidToken("malformed JSON")
        c.p = p + 1
        return _utf8(b.data, b.len)
    finally:
        PyMem_Free(b.data)


# The member names of our header and claims, made once: a key that is one of them is returned as this
# str, which saves an allocation and a hash per key on every token parsed.
cdef tuple _KNOWN_KEYS = ("iss", "sub", "aud", "iat", "nbf", "exp", "jti", "tenant", "wf", "tool", "act",
                          "dst", "alg", "kid", "typ")


# The same names as C data, so j_key compares bytes without touching a Python object.
cdef enum:
    _N_KNOWN = 15
cdef Py_ssize_t _known_len[_N_KNOWN]
cdef char _known_txt[_N_KNOWN][8]


cdef void _init_known():
    cdef int i
    cdef bytes t
    for i in range(_N_KNOWN):
        t = (<str>_KNOWN_KEYS[i]).encode("ascii")
        _known_len[i] = len(t)
        memcpy(_known_txt[i], PyBytes_AS_STRING(t), len(t))


assert len(_KNOWN_KEYS) == _N_KNOWN and max(len(k) for k in _KNOWN_KEYS) <= 7
_init_known()


cdef str j_key(cursor_t *c, int *idx):
    # c.p is just past the opening quote. Only a plain ASCII name of a known key is shortcut (idx is set to
    # its index in _KNOWN_KEYS, else to -1); anything else (escapes included, so "\u0069ss" still decodes to
    # the same str) takes j_string.
    cdef const uint8_t *q = c.p
    cdef Py_ssize_t n
    cdef int i
    cdef str k
    idx[0] = -1
    while q < c.end and q - c.p < 7 and 0x61 <= q[0] <= 0x7A:
        q += 1
    if q < c.end and q[0] == b'"':
        n = q - c.p
        for i in range(_N_KNOWN):
            if _known_len[i] == n and memcmp(_known_txt[i], c.p, n) == 0:
                c.p = q + 1
                idx[0] = i
                return <str>_KNOWN_KEYS[i]
    return j_string(c)


cdef str j_string(cursor_t *c):
    # c.p is just past the opening quote.
    cdef const uint8_t *start = c.p
    cdef const uint8_t *p = start
    cdef uint8_t ch, hi = 0
    cdef str out
    while p < c.end:
        ch = p[0]
        if ch == b'"':
            c.p = p + 1
            if hi < 0x80:
                # Plain ASCII (the usual claim): copied into a new str, no UTF-8 decoder needed.
                out = PyUnicode_New(p - start, 127)
                memcpy(PyUnicode_DATA(out), start, p - start)
                return out
            return _utf8(start, p - start)
        hi |= ch
        if ch == b'\\':
            return j_string_escaped(c, start)
        if ch < 0x20:
            # Raw control characters are not allowed inside JSON strings.
            raise InvalidToken("malformed JSON")
        p += 1
    raise InvalidToken("malformed JSON")


cdef object j_number(cursor_t *c):
    cdef const uint8_t *start = c.p
    cdef const uint8_t *p = c.p
    cdef bint is_float = False
    cdef int64_t v = 0
    cdef Py_ssize_t ndigits, i
    if p < c.end and p[0] == b'-':
        p += 1
    if p >= c.end or not (48 <= p[0] <= 57):
        raise InvalidToken("malformed JSON")
    if p[0] == b'0':
        p += 1
    else:
        while p < c.end and 48 <= p[0] <= 57:
            p += 1
    ndigits = p - start
    if p < c.end and p[0] == b'.':
        p += 1
        if p >= c.end or not (48 <= p[0] <= 57):
            raise InvalidToken("malformed JSON")
        while p < c.end and 48 <= p[0] <= 57:
            p += 1
        is_float = True
    if p < c.end and (p[0] == b'e' or p[0] == b'E'):
        p += 1
        if p < c.end and (p[0] == b'+' or p[0] == b'-'):
            p += 1
        if p >= c.end or not (48 <= p[0] <= 57):
            raise InvalidToken("malformed JSON")
        while p < c.end and 48 <= p[0] <= 57:
            p += 1
        is_float = True
    c.p = p
    if is_float:
        return float(PyBytes_FromStringAndSize(<const char *>start, p - start))
    if ndigits <= 18:
        for i in range(1 if start[0] == b'-' else 0, ndigits):
            v = v * 10 + (start[i] - 48)
        return PyLong_FromLongLong(-v if start[0] == b'-' else v)
    try:
        return int(PyBytes_FromStringAndSize(<const char *>start, p - start))
    except ValueError:  # more digits than Python's int-from-text limit, as in json.loads
        raise InvalidToken("malformed JSON") from None


cdef object j_value(cursor_t *c):
    cdef uint8_t ch
    skip_ws(c)
    if c.p >= c.end:
        raise InvalidToken("malformed JSON")
    ch = c.p[0]
    if ch == b'"':
        c.p += 1
        return j_string(c)
    if ch == b'{':
        return j_object(c)
    if ch == b'[':
        return j_array(c)
    if ch == b't' and c.end - c.p >= 4 and memcmp(c.p, b"true", 4) == 0:
        c.p += 4
        return True
    if ch == b'f' and c.end - c.p >= 5 and memcmp(c.p, b"false", 5) == 0:
        c.p += 5
        return False
    if ch == b'n' and c.end - c.p >= 4 and memcmp(c.p, b"null", 4) == 0:
        c.p += 4
        return None
    return j_number(c)


cdef int _enter(cursor_t *c) except -1:
    c.depth += 1
    if c.depth > _MAX_DEPTH:
        raise InvalidToken("JSON nested too deeply")
    c.p += 1
    skip_ws(c)
    return 0


cdef dict j_object(cursor_t *c):
    # The top-level object is a claim set (a dozen members): sized for it up front, not grown twice.
    # A plain dict: presizing needs a private CPython call that newer versions do not export.
    cdef dict out = {}
    cdef str key
    cdef int idx
    cdef uint32_t seen = 0  # the known keys met so far, by index: their duplicates are found without a lookup
    cdef bint other = False  # a key that did not take j_key's shortcut is in out (maybe a known name, escaped)
    _enter(c)
    if c.p < c.end and c.p[0] == b'}':
        c.p += 1
        c.depth -= 1
        return out
    while True:
        if c.p >= c.end or c.p[0] != b'"':
            raise InvalidToken("malformed JSON")
        c.p += 1
        key = j_key(c, &idx)
        skip_ws(c)
        if c.p >= c.end or c.p[0] != b':':
            raise InvalidToken("malformed JSON")
        c.p += 1
        # A known key given once as plain text and once with escapes is found by the dict lookup.
        if (idx >= 0 and seen & ((<uint32_t>1) << idx)) or ((idx < 0 or other) and PyDict_Contains(out, key)):
            # Two parsers could pick different duplicates; refuse instead of guessing.
            raise InvalidToken(f"duplicate JSON key {key!r}")
        PyDict_SetItem(out, key, j_value(c))
        if idx >= 0:
            seen |= (<uint32_t>1) << idx
        else:
            other = True
        skip_ws(c)
        if c.p < c.end and c.p[0] == b',':
            c.p += 1
            skip_ws(c)
            continue
        if c.p < c.end and c.p[0] == b'}':
            c.p += 1
            c.depth -= 1
            return out
        raise InvalidToken("malformed JSON")


cdef list j_array(cursor_t *c):
    cdef list out = []
    _enter(c)
    if c.p < c.end and c.p[0] == b']':
        c.p += 1
        c.depth -= 1
        return out
    while True:
        out.append(j_value(c))
        skip_ws(c)
        if c.p < c.end and c.p[0] == b',':
            c.p += 1
            continue
        if c.p < c.end and c.p[0] == b']':
            c.p += 1
            c.depth -= 1
            return out
        raise InvalidToken("malformed JSON")


cdef dict _parse_json(const uint8_t *p, Py_ssize_t n):
    cdef cursor_t c
    c.p = p
    c.end = p + n
    c.depth = 0
    value = j_value(&c)
    skip_ws(&c)
    if c.p != c.end:
        raise InvalidToken("malformed JSON")
    if not isinstance(value, dict):
        raise InvalidToken("JSON is not an object")
    return value


def parse_json(bytes raw not None):
    """Strict RFC 8259 JSON object: UTF-8, no duplicate keys, no NaN, no lone surrogates, bounded depth."""
    return _parse_json(<const uint8_t *>PyBytes_AS_STRING(raw), PyBytes_GET_SIZE(raw))


# ---------------------------------------------------------------------------------------------------------
# Signatures

cdef bytes _der_to_raw(bytes der):
    cdef uint8_t out[64]
    _der_into(der, out)
    return PyBytes_FromStringAndSize(<const char *>out, 64)


cdef int _der_into(bytes der, uint8_t *out) except -1:
    # ECDSA-Sig-Value ::= SEQUENCE { r INTEGER, s INTEGER } with short-form lengths (P-256 fits in 72 bytes).
    cdef const uint8_t *d = <const uint8_t *>PyBytes_AS_STRING(der)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(der), i = 2, j, k, ln
    if n < 8 or d[0] != 0x30 or d[1] != n - 2:
        raise BrokerError("unexpected ECDSA signature encoding")
    for k in range(2):
        if i + 2 > n or d[i] != 0x02:
            raise BrokerError("unexpected ECDSA signature encoding")
        ln = d[i + 1]
        i += 2
        if ln < 1 or i + ln > n:
            raise BrokerError("unexpected ECDSA signature encoding")
        while ln > 32 and d[i] == 0:
            i += 1
            ln -= 1
        if ln > 32:
            raise BrokerError("unexpected ECDSA signature encoding")
        # Left-pad to the fixed 32-byte width of RFC 7518 section 3.4.
        for j in range(32 - ln):
            out[k * 32 + j] = 0
        memcpy(out + k * 32 + 32 - ln, d + i, ln)
        i += ln
    return 0


cdef Py_ssize_t _der_int(const uint8_t *x, uint8_t *dst) noexcept:
    # One 32-byte big-endian integer as a DER INTEGER: minimal length, a 0x00 in front of a high bit.
    cdef Py_ssize_t skip = 0, ln
    while skip < 31 and x[skip] == 0:
        skip += 1
    ln = 32 - skip
    dst[0] = 0x02
    if x[skip] & 0x80:
        dst[1] = <uint8_t>(ln + 1)
        dst[2] = 0
        memcpy(dst + 3, x + skip, ln)
        return ln + 3
    dst[1] = <uint8_t>ln
    memcpy(dst + 2, x + skip, ln)
    return ln + 2


cdef bytes _raw_to_der(const uint8_t *sig):
    cdef uint8_t out[72]
    cdef Py_ssize_t n = 2
    n += _der_int(sig, out + n)
    n += _der_int(sig + 32, out + n)
    out[0] = 0x30
    out[1] = <uint8_t>(n - 2)
    return PyBytes_FromStringAndSize(<const char *>out, n)


cdef bint _ct_equal(const uint8_t *a, const uint8_t *b, Py_ssize_t n) noexcept:
    # Constant time: every byte is compared whatever the earlier ones were, so timing reveals nothing.
    cdef volatile uint8_t acc = 0
    cdef Py_ssize_t i
    for i in range(n):
        acc |= a[i] ^ b[i]
    return acc == 0


cdef bytes _sign(object key, bytes data):
    # SigningKey checked at construction that its material fits key.alg, so dispatching on alg is safe.
    cdef str alg = key.alg
    if alg == _ES256:
        return _der_to_raw(key.private.sign(data, _ECDSA))
    if alg == _EDDSA:
        return key.private.sign(data)
    return _hmac_digest(key.secret, data, "sha256")


cdef int _check_signature(object key, str alg, bytes data, const uint8_t *s_seg, Py_ssize_t s_len) except -1:
    cdef uint8_t sig[64]
    cdef Py_ssize_t want = 32 if alg == _HS256 else 64
    cdef bytes tag
    if s_len > 86:
        # Longer than any signature we accept, so it must not be decoded into sig[]; decoding it on the
        # heap first keeps the reason the same as the pure engine's.
        _b64decode(s_seg, s_len)
        raise InvalidToken("bad signature length")
    if b64_decode_into(s_seg, s_len, sig) != want:
        if b64_decode_into(s_seg, s_len, sig) < 0:
            raise InvalidToken("non-canonical base64url")
        raise InvalidToken("bad signature length")
    if alg == _HS256:
        tag = _hmac_digest(key.secret, data, "sha256")
        if not _ct_equal(<const uint8_t *>PyBytes_AS_STRING(tag), sig, 32):
            raise InvalidToken("bad signature")
        return 0
    try:
        if alg == _ES256:
            key.public.verify(_raw_to_der(sig), data, _ECDSA)
        else:
            key.public.verify(PyBytes_FromStringAndSize(<const char *>sig, 64), data)
    except InvalidSignature:
        raise InvalidToken("bad signature") from None
    return 0


# ---------------------------------------------------------------------------------------------------------
# Minting

cdef int _header(buf_t *b, object key, bint with_kid, object typ) except -1:
    buf_put(b, b'{"alg":', 7)
    enc_str(b, key.alg)
    if with_kid:
        buf_put(b, b',"kid":', 7)
        enc_str(b, key.kid)
    if typ is not None:
        buf_put(b, b',"typ":', 7)
        enc_str(b, typ)
    return buf_byte(b, b'}')


# The base64url header segment of the last key minted with (alg, kid, typ "JWT"): it depends on those two
# strings only, and a broker mints with one key for a long time. One tuple, replaced whole.
cdef tuple _mint_hdr = (None, None, b"")


cdef bytes _header_seg(object key, bint with_kid, object typ):
    global _mint_hdr
    cdef buf_t js
    cdef tuple memo = _mint_hdr
    cdef bint memo_ok = with_kid and type(typ) is str and typ == "JWT"
    alg = key.alg
    kid = key.kid if with_kid else None
    if memo_ok and memo[0] is alg and memo[1] is kid:
        return <bytes>memo[2]
    js.data = NULL
    try:
        buf_init(&js, 128)
        _header(&js, key, with_kid, typ)
        seg = PyBytes_FromStringAndSize(NULL, b64_len(js.len))
        b64_encode_into(js.data, js.len, <uint8_t *>PyBytes_AS_STRING(seg))
    finally:
        PyMem_Free(js.data)
    if memo_ok and type(alg) is str and type(kid) is str:
        _mint_hdr = (alg, kid, seg)
    return seg


cdef bytes _sign_compact(object key, const uint8_t *payload, Py_ssize_t n, bint with_kid, object typ):
    # The signing input is written straight into its bytes object (its length is known up front), and the
    # token into another; an ES256 signature goes from DER to r||s on the stack.
    cdef bytes hseg = _header_seg(key, with_kid, typ)
    cdef Py_ssize_t h = PyBytes_GET_SIZE(hseg), m = h + 1 + b64_len(n), sl
    cdef bytes signing_input = PyBytes_FromStringAndSize(NULL, m)
    cdef bytes sig, out
    cdef uint8_t *q = <uint8_t *>PyBytes_AS_STRING(signing_input)
    cdef uint8_t rs[64]
    cdef const uint8_t *sp
    memcpy(q, PyBytes_AS_STRING(hseg), h)
    q[h] = b'.'
    b64_encode_into(payload, n, q + h + 1)
    if key.alg == _ES256:
        _der_into(key.private.sign(signing_input, _ECDSA), rs)
        sp = rs
        sl = 64
    else:
        sig = _sign(key, signing_input)
        sp = <const uint8_t *>PyBytes_AS_STRING(sig)
        sl = PyBytes_GET_SIZE(sig)
    out = PyBytes_FromStringAndSize(NULL, m + 1 + b64_len(sl))
    q = <uint8_t *>PyBytes_AS_STRING(out)
    memcpy(q, PyBytes_AS_STRING(signing_input), m)
    q[m] = b'.'
    b64_encode_into(sp, sl, q + m + 1)
    return out


def sign_compact(key, const uint8_t[::1] payload not None, *, bint kid=True, typ="JWT"):
    """Sign arbitrary ``payload`` bytes as a JWS compact token with header alg[, kid][, typ]."""
    cdef const uint8_t *p = <const uint8_t *>b""
    if typ is not None and typ not in _TYPS:
        raise BrokerError(f"typ must be one of {_TYPS} or None")
    if payload.shape[0]:
        p = &payload[0]
    return _sign_compact(key, p, payload.shape[0], kid, typ)


def mint(key, claims):
    """Encode and sign ``claims`` with ``key`` as a JWS compact token."""
    cdef buf_t b
    cdef PyObject **slots
    cdef Py_ssize_t i
    cdef bint direct = _claims_fast and type(claims) is _Claims
    if direct:
        # An exact Claims: its fields are read straight from its slots (all must be set; otherwise the
        # attribute reads below raise as the pure engine's do).
        for i in range(12):
            if (<PyObject **>((<char *><PyObject *>claims) + _claim_off[i]))[0] == NULL:
                direct = False
                break
    if direct:
        iss = _slot(claims, 0)
        sub = _slot(claims, 1)
        aud = _slot(claims, 2)
        iat = _slot(claims, 3)
        nbf = _slot(claims, 4)
        exp = _slot(claims, 5)
        jti = _slot(claims, 6)
        tenant = _slot(claims, 7)
        wf = _slot(claims, 8)
        tool = _slot(claims, 9)
        act = _slot(claims, 10)
        dst = _slot(claims, 11)
        problem = _mint_problem_v(iss, sub, aud, iat, nbf, exp, jti, tenant, wf, tool, act, dst)
    else:
        problem = _mint_problem(claims)
    if problem is not None:
        # A programming error of the caller, not a token failure: raised as the plain root error.
        raise BrokerError(f"cannot mint: {problem}")
    buf_init(&b, 512)
    try:
        if direct:
            enc_claims_v(&b, iss, sub, aud, iat, nbf, exp, jti, tenant, wf, tool, act, dst)
        else:
            enc_claims(&b, claims)
        return _sign_compact(key, b.data, b.len, True, "JWT")
    finally:
        PyMem_Free(b.data)


# ---------------------------------------------------------------------------------------------------------
# Verification

cdef bytes _raw(object token):
    if isinstance(token, bytes):
        return <bytes>token
    if isinstance(token, str):
        return (<str>token).encode("ascii", "replace")
    return bytes(token)


# The last header segment that passed the header checks, with its alg, kid and parsed header: the checks
# are a function of the segment's bytes alone, and a verifier sees the same few segments over and over.
# One tuple, replaced whole, so a reader never sees a half-updated memo.
cdef tuple _hdr_memo = (b"", None, None, None)


cdef object _check_header(const uint8_t *t, Py_ssize_t d1):
    # (alg, kid, header) of the header segment t[:d1], or raises with the pure engine's reason.
    global _hdr_memo
    cdef tuple memo = _hdr_memo
    cdef bytes seg = <bytes>memo[0]
    cdef bytes h_json
    cdef dict header
    if PyBytes_GET_SIZE(seg) == d1 and d1 and memcmp(PyBytes_AS_STRING(seg), t, d1) == 0:
        return memo
    h_json = _b64decode(t, d1)
    header = _parse_json(<const uint8_t *>PyBytes_AS_STRING(h_json), PyBytes_GET_SIZE(h_json))
    if len(header) > 3 or not header.keys() <= _HEADER_KEYS:
        # jku, x5u, jwk, crit, b64 and anything else we do not implement: refuse, never ignore.
        raise InvalidToken(f"unsupported header parameters {sorted(header.keys() - _HEADER_KEYS)}")
    if "typ" in header and header["typ"] not in _TYPS:
        raise InvalidToken("unsupported typ")
    alg = header.get("alg")
    kid = header.get("kid")
    if not isinstance(alg, str):
        raise InvalidToken("alg missing")
    if kid is not None and not isinstance(kid, str):
        raise InvalidToken("kid is not a string")
    memo = (PyBytes_FromStringAndSize(<const char *>t, d1), alg, kid, header)
    _hdr_memo = memo
    return memo


cdef tuple _verify_sig(bytes raw, object keys, Py_ssize_t *d2_out):
    # Checks the framing, header and signature of raw; returns the header memo (see _check_header) and
    # sets d2_out to where the payload segment ends (it starts just past the first dot).
    cdef const uint8_t *t = <const uint8_t *>PyBytes_AS_STRING(raw)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(raw), d1, d2
    cdef const uint8_t *dot
    cdef tuple memo
    cdef PyObject *found
    if n > _MAX_TOKEN:
        raise InvalidToken("token too large")
    dot = <const uint8_t *>memchr(t, b'.', n)
    if dot == NULL:
        raise InvalidToken("not a JWS compact token")
    d1 = dot - t
    dot = <const uint8_t *>memchr(t + d1 + 1, b'.', n - d1 - 1)
    if dot == NULL or memchr(dot + 1, b'.', n - (dot - t) - 1) != NULL:
        raise InvalidToken("not a JWS compact token")
    d2 = dot - t
    memo = <tuple>_check_header(t, d1)
    alg = memo[1]
    kid = memo[2]
    if isinstance(keys, _VerifyKey):
        if kid is not None and kid != keys.kid:
            raise InvalidToken("kid does not match the key")
        key = keys
    else:
        if kid is None:
            raise InvalidToken("kid missing")
        if type(keys) is dict:
            found = PyDict_GetItem(keys, kid)
            key = <object>found if found != NULL else None
        else:
            key = keys.get(kid)
        if key is None:
            raise InvalidToken("unknown kid")
    # The key decides the algorithm, never the token: defeats alg=none and HMAC/public-key confusion.
    if alg != key.alg:
        raise InvalidToken("alg does not match the key")
    _check_signature(key, alg, PyBytes_FromStringAndSize(<const char *>t, d2), t + d2 + 1, n - d2 - 1)
    d2_out[0] = d2
    return memo


cdef tuple _verify_signature(bytes raw, object keys):
    cdef Py_ssize_t d2 = 0
    cdef tuple memo = _verify_sig(raw, keys, &d2)
    cdef const uint8_t *t = <const uint8_t *>PyBytes_AS_STRING(raw)
    cdef const uint8_t *p = <const uint8_t *>memchr(t, b'.', d2) + 1
    # A copy: the memo's dict is shared, the caller's is its own.
    return dict(<dict>memo[3]), _b64decode(p, d2 - (p - t))


def verify_signature(token, keys):
    """Check the JOSE framing and the signature only; return the header and the raw payload bytes."""
    return _verify_signature(_raw(token), keys)


cdef str _str(dict d, str name):
    cdef PyObject *v = PyDict_GetItem(d, name)
    if v == NULL or not isinstance(<object>v, str):
        raise InvalidToken(f"claim {name} is not a string")
    return <str>v


cdef object _int(dict d, str name):
    cdef PyObject *v = PyDict_GetItem(d, name)
    if v == NULL or not _is_int(<object>v):
        raise InvalidToken(f"claim {name} is not an integer")
    return <object>v


cdef tuple _strs(dict d, str name):
    cdef PyObject *v = PyDict_GetItem(d, name)
    cdef object x
    if v == NULL:
        return ()
    if not isinstance(<object>v, list):
        raise InvalidToken(f"claim {name} is not a list of strings")
    for x in <list>v:
        if not isinstance(x, str):
            raise InvalidToken(f"claim {name} is not a list of strings")
    return tuple(<list>v)


# The slot offsets of Claims' fields, in declaration order, read once from its member descriptors. With
# them a Claims is one allocation and twelve pointer stores; if the class ever stops being a plain slotted
# class (checked here), _parse_claims falls back to setting the slots through the descriptors.
cdef tuple _CLAIM_FIELDS = ("iss", "sub", "aud", "iat", "nbf", "exp", "jti", "tenant", "wf", "tool", "act",
                            "dst")
cdef Py_ssize_t _claim_off[12]
cdef bint _claims_fast = False


cdef bint _init_claim_offsets():
    cdef Py_ssize_t i
    cdef PyMemberDef *m
    if type(_Claims) is not type or _Claims.__new__ is not object.__new__ \
            or tuple(_Claims.__dict__.get("__slots__", ())) != _CLAIM_FIELDS \
            or hasattr(_Claims, "__post_init__"):
        return False
    member_descr = type(_Claims.__dict__["iss"])
    if member_descr.__name__ != "member_descriptor":
        return False
    for i in range(12):
        descr = _Claims.__dict__[_CLAIM_FIELDS[i]]
        if type(descr) is not member_descr or descr.__objclass__ is not _Claims:
            return False
        m = (<PyMemberDescrObject *><PyObject *>descr).d_member
        if m.type != T_OBJECT_EX or m.flags & READONLY or m.offset <= 0:
            return False
        _claim_off[i] = m.offset
    return True


_claims_fast = _init_claim_offsets()


cdef inline void _put_slot(PyObject *o, Py_ssize_t off, object v) noexcept:
    cdef PyObject **slot = <PyObject **>((<char *>o) + off)
    Py_INCREF(<PyObject *>v)
    Py_XDECREF(slot[0])
    slot[0] = <PyObject *>v


cdef inline object _slot(object c, int i):
    # Field i of an exact Claims whose slots are all set (the caller checked): a new reference.
    return <object>(<PyObject **>((<char *><PyObject *>c) + _claim_off[i]))[0]


cdef object _new_claims(object iss, object sub, object aud, object iat, object nbf, object exp, object jti,
                        object tenant, object wf, object tool, object act, object dst):
    cdef PyTypeObject *tp = <PyTypeObject *>_Claims
    cdef PyObject *o = tp.tp_alloc(tp, 0)
    if o == NULL:
        raise MemoryError()
    # tp_alloc returned a new reference: hand it to a Python variable, which owns it from here.
    c = <object>o
    Py_XDECREF(o)
    _put_slot(o, _claim_off[0], iss)
    _put_slot(o, _claim_off[1], sub)
    _put_slot(o, _claim_off[2], aud)
    _put_slot(o, _claim_off[3], iat)
    _put_slot(o, _claim_off[4], nbf)
    _put_slot(o, _claim_off[5], exp)
    _put_slot(o, _claim_off[6], jti)
    _put_slot(o, _claim_off[7], tenant)
    _put_slot(o, _claim_off[8], wf)
    _put_slot(o, _claim_off[9], tool)
    _put_slot(o, _claim_off[10], act)
    _put_slot(o, _claim_off[11], dst)
    return c


cdef object _parse_claims(bytes payload):
    return _claims_from(<const uint8_t *>PyBytes_AS_STRING(payload), PyBytes_GET_SIZE(payload))


cdef object _claims_from(const uint8_t *p, Py_ssize_t n):
    cdef dict d = _parse_json(p, n)
    cdef object aud = d.get("aud")
    cdef tuple auds
    if isinstance(aud, str):
        auds = (aud,)
    elif isinstance(aud, list) and aud and _is_str_seq(aud):
        auds = tuple(aud)
    else:
        raise InvalidToken("claim aud is missing or malformed")
    # An explicit null tool is malformed, not absent.
    tool = _str(d, "tool") if "tool" in d else None
    # Checked in the pure engine's order, so a token with several bad claims gets the same reason.
    iss = _str(d, "iss")
    sub = _str(d, "sub")
    iat = _int(d, "iat")
    nbf = _int(d, "nbf")
    exp = _int(d, "exp")
    jti = _str(d, "jti")
    tenant = _str(d, "tenant")
    wf = _str(d, "wf")
    act = _strs(d, "act")
    dst = _strs(d, "dst")
    # Claims is a frozen, slotted dataclass without __post_init__: filling its slots directly is what its
    # generated __init__ does, at a fraction of the cost (the tests compare the two).
    if _claims_fast:
        return _new_claims(iss, sub, auds, iat, nbf, exp, jti, tenant, wf, tool, act, dst)
    c = _Claims.__new__(_Claims)
    PyObject_GenericSetAttr(c, "iss", iss)
    PyObject_GenericSetAttr(c, "sub", sub)
    PyObject_GenericSetAttr(c, "aud", auds)
    PyObject_GenericSetAttr(c, "iat", iat)
    PyObject_GenericSetAttr(c, "nbf", nbf)
    PyObject_GenericSetAttr(c, "exp", exp)
    PyObject_GenericSetAttr(c, "jti", jti)
    PyObject_GenericSetAttr(c, "tenant", tenant)
    PyObject_GenericSetAttr(c, "wf", wf)
    PyObject_GenericSetAttr(c, "tool", tool)
    PyObject_GenericSetAttr(c, "act", act)
    PyObject_GenericSetAttr(c, "dst", dst)
    return c


def parse_claims(bytes payload not None):
    """The typed claims of a verified payload; unknown claims are ignored, known ones must be well typed."""
    return _parse_claims(payload)


cdef int _check_claims(object c, object expect, object now) except -1:
    cdef str td = expect.trust_domain
    cdef str iss = c.iss
    cdef str sub = c.sub
    cdef object leeway = expect.leeway
    cdef object tool
    if now != now:  # NaN: every comparison below would be false, and an expired token would pass
        raise InvalidToken("the clock reading is not a number")
    if iss != "spiffe://" + td or not sub.startswith("spiffe://" + td + "/workflow/"):
        raise InvalidToken("issuer or subject outside the trust domain")
    if sub != "spiffe://" + td + "/workflow/" + c.wf:
        raise InvalidToken("subject does not name the workflow")
    if now >= c.exp + leeway:
        raise InvalidToken("expired")
    if now + leeway < c.nbf or now + leeway < c.iat:
        raise InvalidToken("not yet valid")
    # The tool first: a token shown to another tool fails on both, and "wrong tool" is the cause.
    tool = expect.tool
    if tool is not None and c.tool != tool:
        raise InvalidToken("wrong tool")
    if expect.audience not in c.aud:
        raise InvalidToken("wrong audience")
    return 0


def check_claims(claims, expect, now):
    _check_claims(claims, expect, now)


cdef enum:
    _PAYLOAD_MAX = 6144

if _MAX_TOKEN * 3 // 4 > _PAYLOAD_MAX:
    raise ImportError("MAX_TOKEN_BYTES outgrew the payload buffer of verify")


def verify(token, keys, expect, now):
    """Check ``token`` fully; return its claims or raise :class:`InvalidToken` (reason inside)."""
    cdef bytes raw = _raw(token)
    cdef Py_ssize_t d2 = 0
    _verify_sig(raw, keys, &d2)
    cdef const uint8_t *t = <const uint8_t *>PyBytes_AS_STRING(raw)
    cdef const uint8_t *p = <const uint8_t *>memchr(t, b'.', d2) + 1
    cdef uint8_t buf[_PAYLOAD_MAX]
    cdef Py_ssize_t m
    # The payload is decoded into the stack and parsed from there: no bytes object in between. It fits:
    # the token is at most _MAX_TOKEN bytes, so its payload segment decodes to at most 3/4 of that.
    m = b64_decode_into(p, d2 - (p - t), buf)
    if m < 0:
        raise InvalidToken("non-canonical base64url")
    claims = _claims_from(buf, m)
    _check_claims(claims, expect, now)
    return claims


# ---------------------------------------------------------------------------------------------------------
# The verified-token cache
#
# A dict from the token's SHA-256 to an entry, and a clock over the entries for eviction: each slot of
# the ring holds one entry and a "used since the hand last passed" bit. A hit only sets that bit (where
# an exact LRU would relink a list on every hit); a put into a full cache sweeps the hand forward,
# clearing set bits, and evicts the first entry whose bit is clear, so the sweep is bounded by one
# turn of the ring. Slots emptied by a discard are reused first, last freed first. The pure twin runs
# the same algorithm step for step, so both evict the same tokens.

# Times whose magnitude is below this are compared as C integers: no sum of two of them overflows.
cdef int64_t _SMALL = (<int64_t>1) << 61


@cython.final
@cython.no_gc
cdef class _Entry:
    # No cycles can pass through an entry (it holds bytes, str, Claims and Expect), so the GC need not
    # track it, and creating one can never start a collection in the middle of a put.
    cdef bytes digest
    cdef object claims
    cdef str kid
    cdef Py_ssize_t slot  # its index in the ring; -1 once removed
    cdef bint ref         # used since the clock hand last passed it
    cdef bint small       # exp, nbf and iat are exact ints below _SMALL: the hit checks them in C
    cdef int64_t exp, nbf, iat
    # The last Expect (an exact, frozen Expect) these claims passed every check of at some time. The
    # checks that do not depend on the time are a function of the claims and the Expect alone, so for
    # the same Expect object a hit need only redo the clock checks.
    cdef object ok
    cdef int64_t leeway   # ok.leeway


cdef inline bint _small_int(object v, int64_t *out):
    cdef int overflow = 0
    cdef long long x
    if not PyLong_CheckExact(v):
        return False
    x = PyLong_AsLongLongAndOverflow(v, &overflow)
    if overflow or not -_SMALL < x < _SMALL:
        return False
    out[0] = x
    return True


cdef class VerifiedCache:
    """Tokens verified before, by the SHA-256 of their full bytes, evicted by a clock (second chance).

    Keyed by a hash rather than the token so the cache holds no usable bearer tokens; a cryptographic
    hash, so no other token can be made to land on a cached one's entry. Each entry keeps the claims and
    the kid that verified them, so a retired key or a revoked jti can be swept out. A hit still runs the
    claim checks against the caller's ``Expect``: the cache vouches for the signature and the parse
    only. Safe to share between threads: each method holds the GIL from start to end.
    """

    cdef dict _map    # digest -> _Entry
    cdef list _ring   # slot -> _Entry, or None for a slot in _free
    cdef list _free   # slots emptied by a discard
    cdef Py_ssize_t _hand
    cdef Py_ssize_t _max

    def __init__(self, max_entries):
        if not isinstance(max_entries, int) or max_entries < 1:
            raise BrokerError("max_entries must be a positive integer")
        self._max = max_entries
        self._map = {}
        self._ring = []
        self._free = []
        self._hand = 0

    @property
    def max_entries(self):
        return self._max

    def __len__(self):
        return len(self._map)

    cdef int _remove(self, _Entry e) except -1:
        if e.slot < 0:
            return 0  # already gone
        del self._map[e.digest]
        self._ring[e.slot] = None
        self._free.append(e.slot)
        e.slot = -1
        return 0

    cdef object _hit(self, object token, object expect, object now):
        # The claims of a cached token that passes ``expect`` now; None on a miss; raises if it fails.
        cdef bytes raw = <bytes>token if type(token) is bytes else _raw(token)
        cdef PyObject *found
        cdef _Entry e
        cdef int64_t t = 0
        if PyBytes_GET_SIZE(raw) > _MAX_TOKEN:
            return None
        found = PyDict_GetItem(self._map, _sha256(raw).digest())
        if found == NULL:
            return None
        e = <_Entry>found
        if e.small and _small_int(now, &t):
            if t >= e.exp:
                # Never served past exp, leeway or not; the full path decides about the leeway.
                self._remove(e)
                return None
            e.ref = True
            if expect is e.ok and expect is not None:
                # Only the clock checks of _check_claims are left, in its order ("expired" cannot
                # happen here: t < exp).
                if t + e.leeway < e.nbf or t + e.leeway < e.iat:
                    raise InvalidToken("not yet valid")
                return e.claims
        else:
            if now >= e.claims.exp:
                self._remove(e)
                return None
            e.ref = True
        _check_claims(e.claims, expect, now)
        if type(expect) is _Expect and PyLong_CheckExact(expect.leeway):
            e.leeway = expect.leeway
            e.ok = expect
        return e.claims

    def lookup(self, token, expect, now):
        """The claims of a cached token that passes ``expect`` now; None on a miss; raises if it fails."""
        return self._hit(token, expect, now)

    def verify(self, token, expect, now, miss):
        """Like ``lookup``, but a miss returns ``miss(token, expect, now)``: the hit path in one call."""
        claims = self._hit(token, expect, now)
        if claims is None:
            return miss(token, expect, now)
        return claims

    def put(self, token, claims, str kid not None, now):
        """Remember a token that has just passed full verification (an expired one is not kept)."""
        cdef bytes raw = _raw(token)
        cdef _Entry e, old
        cdef PyObject *found
        cdef Py_ssize_t slot
        if now >= claims.exp or PyBytes_GET_SIZE(raw) > _MAX_TOKEN:
            return
        e = _Entry.__new__(_Entry)
        e.digest = _sha256(raw).digest()
        e.claims = claims
        e.kid = kid
        e.small = (_small_int(claims.exp, &e.exp) and _small_int(claims.nbf, &e.nbf)
                   and _small_int(claims.iat, &e.iat))
        found = PyDict_GetItem(self._map, e.digest)
        if found != NULL:
            # Verified again (two threads missed at once): the new entry takes the old one's slot.
            old = <_Entry>found
            slot = old.slot
            old.slot = -1
            e.ref = True
        elif self._free:
            slot = self._free.pop()
        elif len(self._ring) < self._max:
            slot = len(self._ring)
            self._ring.append(None)
        else:
            # Full and no holes, so every slot holds an entry; at most one turn clears every bit.
            while True:
                old = <_Entry>self._ring[self._hand]
                if not old.ref:
                    break
                old.ref = False
                self._hand = (self._hand + 1) % self._max
            del self._map[old.digest]
            old.slot = -1
            slot = self._hand
            self._hand = (self._hand + 1) % self._max
        e.slot = slot
        self._ring[slot] = e
        self._map[e.digest] = e

    def discard_kid(self, str kid):
        """Drop every token verified by ``kid`` (its key was retired); returns how many."""
        cdef _Entry e
        doomed = [e for e in self._map.values() if e.kid == kid]
        for e in doomed:
            self._remove(e)
        return len(doomed)

    def discard_jti(self, str jti):
        """Drop every token with this ``jti`` (it was revoked); returns how many."""
        cdef _Entry e
        doomed = [e for e in self._map.values() if e.claims.jti == jti]
        for e in doomed:
            self._remove(e)
        return len(doomed)

    def clear(self):
        self._map.clear()
        self._ring = []
        self._free = []
        self._hand = 0
