"""The examples a new user copies agree with the reference docs."""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
# One HCL policy stanza: path "..." { capabilities = [...] }, with an optional comment after the brace.
STANZA = re.compile(r'path "([^"]+)" \{[^\n]*\n\s*capabilities = \[([^\]]*)\]')


def _grants(text: str) -> dict[str, set[str]]:
    return {path: {c.strip().strip('"') for c in caps.split(",")} for path, caps in STANZA.findall(text)}


def test_the_dev_setup_policy_grants_what_docs_vault_md_requires() -> None:
    docs = _grants((ROOT / "docs" / "vault.md").read_text())
    script = _grants((ROOT / "examples" / "vault-dev-setup.sh").read_text().replace("$INSTANCE", "host1"))
    assert docs, "no policy found in docs/vault.md"
    # Without pki/revoke every broker exec run with a certificate logs a 403 at its end.
    missing = {p: sorted(caps - script.get(p, set())) for p, caps in docs.items() if caps - script.get(p, set())}
    assert missing == {}
