"""Per-file-type grammar of "a name is assigned a literal", read by the generic rule.

A grammar is a few regexes, each applied to a single line, each with a ``key`` group (the name) and a
``value`` group (the literal). The file type comes from the file name only, so the verdict for a line
never depends on sniffing content.

Recognised forms, by type:

- code (Python, JS/TS, Go, HCL, TOML, JSON and unknown types): ``key = "v"``, ``key: "v"``,
  ``"key": "v"``, ``key := "v"``, ``key => "v"``, ``key: str = "v"``, ``var key string = "v"``,
  ``obj["key"] = "v"``, keyword arguments ``f(key="v")``;
- YAML: ``key: v`` with a quoted or bare value, also in list items;
- INI, .env, .properties, .npmrc: ``key = v``, ``export KEY=v``;
- shell: ``KEY=v``, ``export KEY="v"``, ``--key=v``, ``--key v``;
- Dockerfile: ``ENV KEY=v``, ``ENV KEY v``, ``ARG KEY=v`` plus the shell forms in ``RUN`` lines.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Final

from broker.scan.linear import Match, Regex

# RE2 syntax (linear time, see broker.scan.linear). A quoted value is one of three alternatives, one
# per quote character (RE2 has no backreference to say "the same quote closes it"); value_span()
# picks whichever matched. A bare value must end at whitespace, which the ``after`` group reads.
_KEY: Final = r"""(?P<key>[A-Za-z_$@][\w$.\-]{0,79}|"[^"\n]{1,80}"|'[^'\n]{1,80}')"""
_CHARS: Final = r"""[^"'`\\\n]{1,512}"""
_QUOTED: Final = "(?:\"(?P<v1>" + _CHARS + ")\"|'(?P<v2>" + _CHARS + ")'|`(?P<v3>" + _CHARS + ")`)"
_BARE: Final = r"""(?P<v4>[^\s"'`#;]{1,512})"""
_BARE_END: Final = r"""\s*(?:\s[#;].*)?$"""
_BARE_AFTER: Final = r"""(?P<after>\s|$)"""
# After the operator comes whitespace, a string prefix (r"", b'', f"") or the quote, so "==" (a
# comparison) can never match.
_CODE_SEP: Final = r"""\s*\]?\s*(?::\s*[\w\[\], |.*]{1,60}?)?\s*(?::=|=>|=|:)\s*(?:[rRbBuUfF]{1,2})?"""
_GO_VAR: Final = r"""\b(?:var|const)\s+(?P<key>[A-Za-z_]\w{0,79})\s+[\w.\[\]*]{1,40}\s*=\s*"""
_SHELL_PREFIX: Final = r"""(?P<before>^|[\s;&|(])(?:(?:export|local|readonly|declare(?:\s+-\w+)*)\s+)?"""
_FLAG: Final = r"""(?P<before>^|\s)--(?P<key>[A-Za-z][\w\-]{0,79})(?:=|\s+)"""
_DOCKER_KEY: Final = r"""^\s*(?:ENV|ARG)\s+(?P<key>[A-Za-z_]\w{0,79})(?:=|\s+)"""

_CODE: Final = (Regex(_KEY + _CODE_SEP + _QUOTED),)
_GO: Final = (*_CODE, Regex(_GO_VAR + _QUOTED))
_YAML: Final = (
    Regex(r"""^\s*(?:-\s+)?""" + _KEY + r"""\s*:\s+""" + _QUOTED),
    Regex(r"""^\s*(?:-\s+)?""" + _KEY + r"""\s*:\s+""" + _BARE + _BARE_END),
)
_INI: Final = (
    Regex(r"""^\s*(?:export\s+)?""" + _KEY + r"""\s*[=:]\s*""" + _QUOTED),
    Regex(r"""^\s*(?:export\s+)?""" + _KEY + r"""\s*[=:]\s*""" + _BARE + _BARE_END),
)
_SHELL: Final = (
    Regex(_SHELL_PREFIX + r"""(?P<key>[A-Za-z_]\w{0,79})=""" + _QUOTED),
    Regex(_SHELL_PREFIX + r"""(?P<key>[A-Za-z_]\w{0,79})=""" + _BARE + _BARE_AFTER),
    Regex(_FLAG + _QUOTED),
    Regex(_FLAG + _BARE + _BARE_AFTER),
)
_DOCKER: Final = (
    Regex(_DOCKER_KEY + _QUOTED),
    Regex(_DOCKER_KEY + _BARE + _BARE_AFTER),
    *_SHELL,
)
_VALUE_GROUPS: Final = ("v1", "v2", "v3", "v4")

Grammar = tuple[Regex, ...]


def value_span(m: Match) -> tuple[int, int]:
    """Where the assigned literal is, whichever quoting (or none) it had."""
    for name in _VALUE_GROUPS:
        span = m.span(name)
        if span[0] >= 0:
            return span
    raise AssertionError("every grammar pattern captures a value")


_BY_SUFFIX: Final[dict[str, Grammar]] = {
    **dict.fromkeys((".py", ".pyi", ".pyw", ".js", ".jsx", ".mjs", ".cjs", ".ts", ".tsx", ".mts", ".cts"), _CODE),
    **dict.fromkeys((".json", ".toml", ".tf", ".tfvars", ".hcl", ".nomad"), _CODE),
    ".go": _GO,
    **dict.fromkeys((".yml", ".yaml"), _YAML),
    **dict.fromkeys((".ini", ".cfg", ".conf", ".properties", ".env", ".npmrc", ".pypirc", ".netrc"), _INI),
    **dict.fromkeys((".sh", ".bash", ".zsh", ".ksh", ".bashrc", ".zshrc", ".profile"), _SHELL),
    ".dockerfile": _DOCKER,
}


def grammar_for(path: str) -> Grammar:
    """The grammar for a file, from its name; unknown types get the code grammar."""
    name = PurePosixPath(path).name
    lowered = name.lower()
    if lowered in ("dockerfile", "containerfile") or lowered.startswith(("dockerfile.", "containerfile.")):
        return _DOCKER
    if lowered == ".env" or lowered.startswith(".env.") or lowered.endswith(".env"):
        return _INI
    if lowered in (".npmrc", ".pypirc", ".netrc", ".bashrc", ".zshrc", ".profile"):
        return _BY_SUFFIX[lowered]
    return _BY_SUFFIX.get(PurePosixPath(lowered).suffix, _CODE)
