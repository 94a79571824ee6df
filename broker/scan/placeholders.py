"""Values that look like secrets to a regex but are not: placeholders, references, ids and hashes.

Everything here is a pure function of the candidate value, so a rule's verdict never depends on what
else is in the file.
"""

from __future__ import annotations

import re
from typing import Final

# Template and variable references: "${DB_PASS}", "{{ .token }}", "$(cat key)", "%(pw)s", "<your-key>".
_REFERENCE: Final = re.compile(r"\$\{|\{\{|\$\(|%\(|%[sdr]\b|^\$[A-Za-z_]|<[^<>]{1,64}>|^\{[A-Za-z_]\w*\}$")
_UUID: Final = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
# Digests of common hash functions in hex, and SRI / "sha256:" prefixed digests.
_HEX_DIGEST: Final = re.compile(r"^(?:[0-9a-f]{32}|[0-9a-f]{40}|[0-9a-f]{64}|[0-9a-f]{96}|[0-9a-f]{128})$", re.I)
# Also crypt(3)-style password hashes ("$2b$12$...", "$argon2id$..."): stored verifiers, not credentials.
_PREFIXED_DIGEST: Final = re.compile(
    r"^(?:(?:sha(?:1|224|256|384|512)|md5|blake2b?)[-:=]|\$(?:2[aby]?|argon2(?:id|i|d)|[156]|scrypt|pbkdf2[\w-]*)\$)",
    re.I,
)
# Code and paths, not credentials: dotted names, words joined by separators, URLs and file paths.
_IDENTIFIER: Final = re.compile(r"^(?:[A-Za-z_][A-Za-z_]*(?:[.\-:][A-Za-z_][A-Za-z_]*)*|[a-z]+(?:[A-Z][a-z]+)+)$")
_PATHLIKE: Final = re.compile(r"^(?:[a-z][a-z0-9+.\-]*://(?![^/@\s]*@)|\.{0,2}/|~/|[A-Za-z]:\\)")
_CODE: Final = re.compile(r"[()\[\]{};,]|\s|\\[nrtx0-9]|\.\w+\(")


def is_placeholder(value: str, stopwords: tuple[str, ...]) -> bool:
    """True for values that are obviously stand-ins: stopwords, references, repeated characters."""
    lowered = value.lower()
    if any(word in lowered for word in stopwords):
        return True
    if _REFERENCE.search(value):
        return True
    # "aaaaaaaa", "1111-1111": a value made mostly of one character is filler, whatever its length.
    return max(value.count(c) for c in set(value)) * 2 > len(value)


def _character_classes(value: str) -> int:
    return (
        any(c.islower() for c in value) + any(c.isupper() for c in value) + any(c.isdigit() for c in value)
    )


def is_not_secret_shaped(value: str) -> bool:
    """True for values the generic rule must ignore: ids, digests, identifiers, paths, code.

    A generated secret of twelve or more characters almost surely mixes two of lowercase, uppercase
    and digits; a value with one class only ("geheim$parole") reads as a word, not a key.
    """
    return bool(
        _character_classes(value) < 2
        or _UUID.match(value)
        or _HEX_DIGEST.match(value)
        or _PREFIXED_DIGEST.match(value)
        or _IDENTIFIER.match(value)
        or _PATHLIKE.match(value)
        or _CODE.search(value)
    )
