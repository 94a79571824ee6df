"""Fake credentials in each provider's published format, and a labelled corpus built from them.

Tests and the benchmark use this to make their secrets at run time, so that no file of the repository
holds a literal secret (the repository is scanned by its own CI). Every value comes from a seeded
:class:`random.Random`: the same seed gives the same corpus. None of these values is a live credential.
"""

from __future__ import annotations

import base64
import json
import random
import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

ALNUM: Final = string.ascii_letters + string.digits
URLSAFE: Final = ALNUM + "_-"
B64: Final = ALNUM + "+/"
HEX: Final = "0123456789abcdef"
UPPER_B32: Final = string.ascii_uppercase + "234567"


# A PyPI token is "pypi-" and a base64 macaroon whose first bytes are a version, a field tag and the
# location "pypi.org"; built here rather than written out so that this file holds no token-shaped text.
PYPI_MACAROON_PREFIX: Final = base64.b64encode(b"\x02\x01\x08pypi.org").decode().rstrip("=")


def pick(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _mixed(rng: random.Random, n: int) -> str:
    # Random, but with a digit and both cases, like the generated secrets the generic rule targets.
    body = pick(rng, ALNUM, n - 3) + rng.choice(string.digits) + rng.choice(string.ascii_uppercase)
    return rng.choice(string.ascii_lowercase) + body


def jwt(rng: random.Random, claims: dict[str, object] | None = None) -> str:
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = _b64url(json.dumps(claims or {"sub": pick(rng, ALNUM, 12), "iat": rng.randrange(10**9)}).encode())
    return f"{header}.{payload}.{pick(rng, URLSAFE, 43)}"


def pem_body(rng: random.Random, lines: int = 20) -> str:
    return "\n".join(pick(rng, B64, 64) for _ in range(lines))


def private_key(rng: random.Random, kind: str = "RSA ") -> str:
    label = f"{kind}PRIVATE KEY"
    return f"-----BEGIN {label}-----\n{pem_body(rng)}\n-----END {label}-----"


# One generator per rule id: a value the rule must report. Labelled rules get their label from NAMES.
GENERATORS: Final[dict[str, Callable[[random.Random], str]]] = {
    "aws-access-key-id": lambda r: r.choice(["AKIA", "ASIA"]) + pick(r, UPPER_B32, 16),
    "aws-secret-access-key": lambda r: _mixed(r, 40).replace("a", "/", 1),
    "github-pat": lambda r: "ghp_" + pick(r, ALNUM, 36),
    "github-fine-grained-pat": lambda r: "github_pat_" + pick(r, ALNUM, 22) + "_" + pick(r, ALNUM, 59),
    "github-oauth-token": lambda r: "gho_" + pick(r, ALNUM, 36),
    "github-app-token": lambda r: r.choice(["ghs_", "ghu_"]) + pick(r, ALNUM, 36),
    "github-refresh-token": lambda r: "ghr_" + pick(r, ALNUM, 76),
    "gitlab-token": lambda r: r.choice(["glpat-", "gldt-", "glrt-"]) + pick(r, URLSAFE, 20),
    "slack-token": lambda r: (r.choice(["xoxb-", "xoxp-"]) + pick(r, string.digits, 11) + "-"
                              + pick(r, string.digits, 13) + "-" + pick(r, ALNUM, 24)),
    "slack-webhook": lambda r: ("https://hooks.slack.com/services/T" + pick(r, UPPER_B32, 8) + "/B"
                                + pick(r, UPPER_B32, 10) + "/" + pick(r, ALNUM, 24)),
    "stripe-secret-key": lambda r: r.choice(["sk_live_", "rk_live_", "sk_test_"]) + pick(r, ALNUM, 24),
    "anthropic-api-key": lambda r: "sk-ant-api03-" + pick(r, URLSAFE, 93) + "AA",
    "openai-api-key": lambda r: r.choice([
        "sk-proj-" + pick(r, URLSAFE, 74) + "T3BlbkFJ" + pick(r, URLSAFE, 74),
        "sk-" + pick(r, ALNUM, 20) + "T3BlbkFJ" + pick(r, ALNUM, 20),
        "sk-svcacct-" + pick(r, URLSAFE, 60),
    ]),
    "google-api-key": lambda r: "AIza" + pick(r, URLSAFE, 35),
    "azure-storage-key": lambda r: ("DefaultEndpointsProtocol=https;AccountName=" + pick(r, string.ascii_lowercase, 10)
                                    + ";AccountKey=" + pick(r, B64, 86) + "==;EndpointSuffix=core.windows.net"),
    "twilio-api-key": lambda r: "SK" + pick(r, HEX, 32),
    "twilio-auth-token": lambda r: pick(r, HEX, 32),
    "sendgrid-api-key": lambda r: "SG." + pick(r, URLSAFE, 22) + "." + pick(r, URLSAFE, 43),
    "npm-token": lambda r: "npm_" + pick(r, ALNUM, 36),
    "pypi-token": lambda r: "pypi-" + PYPI_MACAROON_PREFIX + pick(r, URLSAFE, 150),
    "huggingface-token": lambda r: "hf_" + pick(r, string.ascii_letters, 34),
    "vault-token": lambda r: r.choice(["hvs.", "hvb."]) + pick(r, URLSAFE, 90),
    "vault-legacy-token": lambda r: "s." + pick(r, ALNUM, 24),
    "jwt": jwt,
    "database-url-password": lambda r: (r.choice(["postgresql", "mysql", "mongodb+srv", "redis"]) + "://app:"
                                        + _mixed(r, 16) + "@db.internal.test:5432/app"),
    "generic-secret": lambda r: _mixed(r, r.randrange(20, 41)),
}

# The name a value is assigned to, per rule: labelled rules need it, the others look natural with it.
NAMES: Final[dict[str, tuple[str, ...]]] = {
    "aws-access-key-id": ("AWS_ACCESS_KEY_ID", "aws_access_key_id"),
    "aws-secret-access-key": ("AWS_SECRET_ACCESS_KEY", "aws_secret_access_key", "SecretAccessKey"),
    "twilio-auth-token": ("TWILIO_AUTH_TOKEN", "twilio_auth_token"),
    "vault-legacy-token": ("VAULT_TOKEN", "vault_token"),
    "generic-secret": ("api_secret", "client_secret", "DB_PASSWORD", "auth_token", "apiKey", "SIGNING_KEY"),
}
_DEFAULT_NAMES: Final = ("SERVICE_TOKEN", "api_key", "credential")

# How each file type assigns a literal. {k} is the name, {v} the value.
SYNTAXES: Final[dict[str, str]] = {
    "py": '{k} = "{v}"\n',
    "js": 'const {k} = "{v}";\n',
    "ts": "export const {k}: string = '{v}';\n",
    "go": 'func init() {{\n\t{k} := "{v}"\n\t_ = {k}\n}}\n',
    "yaml": "{k}: {v}\n",
    "json": '{{"{k}": "{v}"}}\n',
    "toml": '{k} = "{v}"\n',
    "ini": "[default]\n{k} = {v}\n",
    "env": "{k}={v}\n",
    "sh": 'export {k}="{v}"\n',
    "Dockerfile": "FROM alpine:3\nENV {k}={v}\n",
    "tf": 'variable "x" {{\n  {k} = "{v}"\n}}\n',
}
_FILENAMES: Final = {"env": ".env", "Dockerfile": "Dockerfile"}

# Values that must never be reported, whatever they are assigned to: placeholders and near-misses.
NEGATIVE_VALUES: Final = (
    "AKIA" + "IOSFODNN7" + "EXAMPLE",
    "ghp_" + "x" * 36,
    "${GITHUB_TOKEN}",
    "<your-api-key>",
    "{{ secrets.API_KEY }}",
    "changeme",
    "sk_live_" + "1234",
    "ghp_" + "abc",
    "xxxxxxxxxxxxxxxxxxxxxxxx",
    "your_api_key_here",
    "0123456789abcdef0123456789abcdef01234567",
    "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    "sha512-" + "z4PhNX7vuL3xVChQ1m2AB9Yg5AULVxXcg/SpIdNs6c5H0NE8XYXysP+DGNKHfuwvY7kxvUdBeoGlODJ6+SfaPg==",
    "123e4567-e89b-12d3-a456-426614174000",
    "$2b$12$" + "KIXxPfnK6bDi1BzV.8H5MOqXIhUjZpZbyGdoYTbZ6Z1rnqKWv5iNG",
    "REPLACE_ME",
    "password",
    "/etc/secrets/api-token.txt",
    "https://api.example.com/v1/token",
    "os.environ.get",
    "postgres://user:${DB_PASSWORD}@localhost/db",
    "my.module.SecretKeyHandler",
)
# Whole lines that read as code, not literals: references to the environment or to a vault.
NEGATIVE_LINES: Final = (
    'api_key = os.environ["API_KEY"]\n',
    'password = os.getenv("DB_PASSWORD", "")\n',
    "const token = process.env.GITHUB_TOKEN;\n",
    'secret = vault.read("kv/app")["data"]["secret"]\n',
    "token_type = \"bearer_token_kind_value\"\n",
    'max_tokens = 4096\n',
    'integrity = "sha384-oqVuAfXRKap7fdgcCY5uykM6+R9GqQ8K/uxy9rx7HNQlGYl1kPzQho1wx4JwY8wC"\n',
)


@dataclass(frozen=True, slots=True)
class Label:
    """An expected finding: ``rule`` must be reported on ``line`` of ``path`` (relative)."""

    path: str
    line: int
    rule: str


def _multiline_files(rng: random.Random, index: int) -> list[tuple[str, str, list[Label]]]:
    """Files for rules whose secret spans lines: PEM, OpenSSH, PuTTY and service-account JSON."""
    files: list[tuple[str, str, list[Label]]] = []
    kind = ["RSA ", "", "EC ", "OPENSSH "][index % 4]
    name = f"keys/k{index}.pem"
    files.append((name, private_key(rng, kind) + "\n", [Label(name, 1, "private-key")]))
    putty = (
        "PuTTY-User-Key-File-3: ssh-ed25519\nEncryption: none\nComment: build\nPublic-Lines: 2\n"
        + pem_body(rng, 2) + "\nKey-Derivation: none\nPrivate-Lines: 1\n" + pick(rng, B64, 44)
        + "\nPrivate-MAC: " + pick(rng, HEX, 64) + "\n"
    )
    name = f"keys/k{index}.ppk"
    files.append((name, putty, [Label(name, 9, "putty-private-key")]))
    account = {
        "type": "service_account",
        "project_id": f"demo-{index}",
        "private_key_id": pick(rng, HEX, 40),
        "private_key": private_key(rng, "") + "\n",
        "client_email": f"svc@demo-{index}.iam.gserviceaccount.com",
    }
    name = f"gcp/sa{index}.json"
    text = json.dumps(account, indent=2) + "\n"
    line = next(i for i, ln in enumerate(text.splitlines(), 1) if '"private_key"' in ln)
    files.append((name, text, [Label(name, line, "gcp-service-account")]))
    return files


def build(root: Path, seed: int = 0, per_rule: int = 2) -> tuple[list[Label], list[str]]:
    """Write a labelled corpus under ``root``.

    Returns the labels of the positive set and the relative paths of the negative files, in which no
    finding is expected. Positives: every single-line rule in every syntax, ``per_rule`` times, plus
    multi-line key files. Negatives: placeholders and near-misses in every syntax.
    """
    rng = random.Random(seed)  # noqa: S311 - reproducible fake data: seeded on purpose, never a credential
    labels: list[Label] = []
    files: list[tuple[str, str, list[Label]]] = []
    for rule, gen in GENERATORS.items():
        names = NAMES.get(rule, _DEFAULT_NAMES)
        for syntax, template in SYNTAXES.items():
            for i in range(per_rule):
                value = gen(rng)
                name = rng.choice(names)
                fname = _FILENAMES.get(syntax, f"{rule}-{i}.{syntax}")
                rel = f"pos/{syntax}/{rule}-{i}/{fname}"
                header = "# generated test data\n" if syntax not in ("json",) else ""
                body = template.format(k=name, v=value)
                line = header.count("\n") + next(n for n, ln in enumerate(body.splitlines(), 1) if value in ln)
                files.append((rel, header + body, [Label(rel, line, rule)]))
    for i in range(per_rule * 4):
        files.extend(_multiline_files(rng, i))
    negatives: list[str] = []
    for syntax, template in SYNTAXES.items():
        for j, value in enumerate(NEGATIVE_VALUES):
            for name in ("api_key", "GITHUB_TOKEN", "password", "AWS_SECRET_ACCESS_KEY"):
                fname = _FILENAMES.get(syntax, f"n{j}-{name}.{syntax}")
                rel = f"neg/{syntax}/{j}-{name}/{fname}"
                files.append((rel, template.format(k=name, v=value), []))
                negatives.append(rel)
    rel = "neg/py/lines.py"
    files.append((rel, "".join(NEGATIVE_LINES), []))
    negatives.append(rel)
    for rel, text, file_labels in files:
        target = root / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        labels.extend(file_labels)
    return labels, negatives
