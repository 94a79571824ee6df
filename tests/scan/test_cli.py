"""The command as a user runs it: sources, formats, exit codes, suppressions, hostile input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import jsonschema
import pytest

from tests.scan.conftest import git, run_scan

SCHEMA = json.loads((Path(__file__).parent / "data" / "sarif-schema-2.1.0.json").read_text())


@pytest.fixture
def tree(tmp_path: Path, token) -> tuple[Path, str]:
    root = tmp_path / "tree"
    root.mkdir()
    secret = token("github-pat")
    (root / "app.py").write_text(f'import os\n\nGH = "{secret}"\n')
    (root / "clean.py").write_text("print('hello')\n")
    return root, secret


def test_exit_codes(tree: tuple[Path, str], tmp_path: Path) -> None:
    root, _ = tree
    assert run_scan(".", cwd=root).code == 1
    assert run_scan("clean.py", cwd=root).code == 0
    assert run_scan("--format", "xml", cwd=root).code == 2
    assert run_scan("missing.py", cwd=root).code == 2
    assert run_scan("--since", "HEAD", cwd=root).code == 2


def test_text_report_is_redacted(tree: tuple[Path, str]) -> None:
    root, secret = tree
    result = run_scan(cwd=root)
    assert "app.py:3:7: github-pat:" in result.out
    assert secret not in result.out and secret[:5] not in result.out
    assert secret[:4] + "..." in result.out
    assert secret in run_scan("--no-redact", cwd=root).out


def test_json_report_never_holds_the_secret(tree: tuple[Path, str]) -> None:
    root, secret = tree
    result = run_scan("--format", "json", cwd=root)
    assert secret not in result.out
    [finding] = result.json()["findings"]
    assert (finding["path"], finding["line"], finding["rule"]) == ("app.py", 3, "github-pat")
    assert len(finding["fingerprint"]) == 32 and len(finding["preview"]) <= 7


def test_sarif_is_valid_and_stable(tree: tuple[Path, str], tmp_path: Path) -> None:
    root, secret = tree
    out = tmp_path / "r.sarif"
    assert run_scan("--format", "sarif", "--output", str(out), cwd=root).code == 1
    text = out.read_text()
    assert secret not in text
    log = json.loads(text)
    jsonschema.Draft4Validator(SCHEMA).validate(log)
    [result] = log["runs"][0]["results"]
    assert result["locations"][0]["physicalLocation"]["region"]["startLine"] == 3
    (root / "app.py").write_text("\n\n\n" + (root / "app.py").read_text())
    again = json.loads(run_scan("--format", "sarif", cwd=root).out)["runs"][0]["results"][0]
    assert again["partialFingerprints"] == result["partialFingerprints"]


def test_sarif_has_what_code_scanning_shows_and_sorts_by(tmp_path: Path, token) -> None:
    # Issue 11: code scanning UIs show fullDescription and help, sort by security-severity (a number
    # in a string), and follow alerts by primaryLocationLineHash ("<hash>:<occurrence in the file>").
    secret = token("github-pat")
    (tmp_path / "a.py").write_text(f'A = "{secret}"\nB = "{secret}"\npassword = "{token("npm-token")}x"\n')
    log = json.loads(run_scan("--format", "sarif", ".", cwd=tmp_path).out)
    jsonschema.Draft4Validator(SCHEMA).validate(log)
    run = log["runs"][0]
    for rule in run["tool"]["driver"]["rules"]:
        assert rule["fullDescription"]["text"] and rule["help"]["text"] and rule["help"]["markdown"]
        severity = rule["properties"]["security-severity"]
        assert isinstance(severity, str) and 0.0 < float(severity) <= 10.0
    hashes = [r["partialFingerprints"]["primaryLocationLineHash"] for r in run["results"]]
    assert len(hashes) == 3 and len(set(hashes)) == 3
    first, second = hashes[0].split(":"), hashes[1].split(":")
    assert first[0] == second[0] and (first[1], second[1]) == ("1", "2")  # the same secret twice
    assert secret not in json.dumps(log)


def test_stdin(token) -> None:
    secret = token("slack-webhook")
    result = run_scan("-", "--format", "json", cwd=Path.cwd(), stdin=f"url: {secret}\n")
    assert result.code == 1
    assert result.json()["findings"][0]["path"] == "<stdin>"
    assert run_scan("-", cwd=Path.cwd(), stdin="nothing here\n").code == 0


def test_baseline_follows_the_secret_not_the_line(tree: tuple[Path, str], tmp_path: Path, token) -> None:
    root, secret = tree
    baseline = tmp_path / "baseline.json"
    run_scan("--format", "json", "--output", str(baseline), cwd=root)
    accepted = run_scan("--baseline", str(baseline), cwd=root)
    assert accepted.code == 0
    # Says how much it hid: a baseline that silently accepts everything must not look like a clean tree.
    assert f"baseline {baseline} accepted 1 of 1 finding (1 fingerprint in the file)" in accepted.err
    # The same secret moved to another line (and file) stays accepted.
    (root / "app.py").write_text(f'# moved\n\n\n\nGH = "{secret}"\n')
    assert run_scan("--baseline", str(baseline), cwd=root).code == 0
    # A new secret on the old line is reported.
    (root / "app.py").write_text(f'import os\n\nGH = "{token("github-pat")}"\n')
    assert run_scan("--baseline", str(baseline), cwd=root).code == 1
    (tmp_path / "bad.json").write_text("[]")
    assert run_scan("--baseline", str(tmp_path / "bad.json"), cwd=root).code == 2


def test_config_extends_disables_and_allowlists(tree: tuple[Path, str], tmp_path: Path, rng) -> None:
    root, _ = tree
    acme = "acme_" + "".join(rng.choice("abcdef0123456789") for _ in range(32))
    (root / "svc.py").write_text(f'x = "{acme}"\n')
    cfg = tmp_path / "scan.toml"
    cfg.write_text(
        "[scan]\ndisable = ['github-pat']\n"
        "[allowlist]\npaths = ['''^clean\\.py$''']\n"
        "[[rules]]\nid = 'acme-token'\ndescription = 'Acme'\n"
        "regex = '''acme_[0-9a-f]{32}'''\nkeywords = ['acme_']\nentropy = 3.0\n"
    )
    result = run_scan("--config", str(cfg), "--format", "json", cwd=root)
    assert [f["rule"] for f in result.json()["findings"]] == ["acme-token"]
    cfg.write_text(cfg.read_text() + "[allowlist]\n")  # duplicate table: invalid TOML
    bad = run_scan("--config", str(cfg), cwd=root)
    assert bad.code == 2 and "invalid TOML" in bad.err


@pytest.mark.parametrize(("text", "message"), [
    ("[scan]\nbogus = 1\n", "scan.bogus: unknown key"),
    ("[[rules]]\nid = 'x'\nregex = '(['\n", "rules[0].regex: invalid regex"),
    ("[scan]\ndisable = ['no-such-rule']\n", "unknown rule id"),
    ("[[rules]]\nid = 'x'\nregex = 'a'\nsecret_group = 2\n", "secret_group"),
])
def test_bad_config_is_a_clear_error(tmp_path: Path, text: str, message: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(text)
    result = run_scan("--config", str(cfg), cwd=tmp_path)
    assert result.code == 2
    assert message in result.err


def test_default_config_file_is_discovered(tree: tuple[Path, str]) -> None:
    root, _ = tree
    (root / ".broker-scan.toml").write_text("[allowlist]\npaths = ['''^app\\.py$''']\n")
    assert run_scan(cwd=root).code == 0


def test_hostile_files(tmp_path: Path, token) -> None:
    root = tmp_path / "h"
    root.mkdir()
    outside = tmp_path / "outside.txt"
    outside.write_text(f"k = {token('github-pat')}\n")
    (root / "link.txt").symlink_to(outside)
    (root / "bin.dat").write_bytes(b"\0\1\2" + token("github-pat").encode())
    (root / "latin.py").write_bytes(b"x = '\xff\xfe'\nT = '" + token("npm-token").encode() + b"'\n")
    (root / "huge.js").write_text("a=" + "x" * 3_000_000 + ";b='" + token("google-api-key") + "'\n")
    (root / "dir.py").mkdir()
    os.mkfifo(root / "pipe")
    result = run_scan("--format", "json", cwd=root)
    report = result.json()
    assert sorted((f["path"], f["rule"]) for f in report["findings"]) == [
        ("huge.js", "google-api-key"), ("latin.py", "npm-token")]
    assert report["stats"]["skipped"] == {"binary": 1, "special": 1, "symlink": 1}
    assert "skipped" in result.err


def test_parallel_and_serial_agree(tmp_path: Path) -> None:
    from broker.scan import fakes

    fakes.build(tmp_path, seed=5, per_rule=1)
    serial = run_scan("--jobs", "1", "--format", "json", cwd=tmp_path).json()["findings"]
    parallel = run_scan("--jobs", "2", "--format", "json", cwd=tmp_path).json()["findings"]
    assert serial == parallel and len(serial) > 300


def test_git_worktree_scans_tracked_files_only(repo: Path, token) -> None:
    (repo / "tracked.py").write_text(f'T = "{token("github-pat")}"\n')
    (repo / "untracked.py").write_text(f'U = "{token("github-pat")}"\n')
    git(repo, "add", "tracked.py")
    report = run_scan("--format", "json", cwd=repo).json()
    assert [f["path"] for f in report["findings"]] == ["tracked.py"]


def test_staged_scans_only_added_lines(repo: Path, token) -> None:
    old = token("github-pat")
    (repo / "a.py").write_text(f'OLD = "{old}"\n')
    git(repo, "add", "a.py")
    git(repo, "commit", "-qm", "one")
    assert run_scan("--staged", cwd=repo).code == 0
    new = token("stripe-secret-key")
    (repo / "a.py").write_text(f'OLD = "{old}"\nx = 1\nNEW = "{new}"\n')
    assert run_scan("--staged", cwd=repo).code == 0  # not staged yet
    git(repo, "add", "a.py")
    report = run_scan("--staged", "--format", "json", cwd=repo).json()
    assert [(f["path"], f["line"], f["rule"]) for f in report["findings"]] == [("a.py", 3, "stripe-secret-key")]


def test_history_finds_removed_secrets(repo: Path, token) -> None:
    (repo / "cfg.env").write_text("A=1\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "base")
    base = git(repo, "rev-parse", "HEAD").strip()
    (repo / "cfg.env").write_text(f"A=1\nHF={token('huggingface-token')}\n")
    (repo / "+++ odd name.txt").write_text(f"+++ {token('npm-token')}\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "leak")
    leak = git(repo, "rev-parse", "HEAD").strip()
    (repo / "cfg.env").write_text("A=1\n")
    git(repo, "commit", "-qam", "remove")
    report = run_scan("--history", "--format", "json", cwd=repo).json()
    found = sorted((f["commit"], f["path"], f["line"], f["rule"]) for f in report["findings"])
    assert found == [(leak, "+++ odd name.txt", 1, "npm-token"), (leak, "cfg.env", 2, "huggingface-token")]
    since = run_scan("--history", "--since", leak, "--format", "json", cwd=repo).json()
    assert since["findings"] == []
    assert run_scan("--history", "--since", base, cwd=repo).code == 1
    assert run_scan("--history", "--since", "no-such-rev", cwd=repo).code == 2
    assert run_scan("--staged", cwd=repo.parent).code == 2  # not a repository


def test_history_scans_what_merge_commits_add_themselves(repo: Path, token) -> None:
    def head() -> str:
        return git(repo, "rev-parse", "HEAD").strip()

    (repo / "app.py").write_text("a = 1\nb = 2\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "base")
    trunk = git(repo, "rev-parse", "--abbrev-ref", "HEAD").strip()
    git(repo, "checkout", "-qb", "side")
    (repo / "app.py").write_text("a = 1\nb = 3\n")
    (repo / "side.env").write_text(f"NPM={token('npm-token')}\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "side")
    side = head()
    git(repo, "checkout", "-q", trunk)
    (repo / "app.py").write_text("a = 1\nb = 4\n")
    git(repo, "commit", "-qam", "trunk")
    # A conflicted merge whose resolution types in a secret ...
    subprocess.run(["git", "-C", str(repo), "merge", "-q", "side"], capture_output=True, check=False)
    (repo / "app.py").write_text(f"a = 1\nb = 5\nHF = \"{token('huggingface-token')}\"\n")
    git(repo, "add", "app.py")
    git(repo, "commit", "-qm", "resolve")
    resolved = head()
    # ... and a clean merge that slips one in (an "evil merge").
    git(repo, "checkout", "-qb", "other", "HEAD~1")
    (repo / "other.txt").write_text("x\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "other")
    git(repo, "checkout", "-q", trunk)
    git(repo, "merge", "-q", "--no-commit", "other")
    (repo / "evil.env").write_text(f"STRIPE={token('stripe-secret-key')}\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "merge other")
    evil = head()
    report = run_scan("--history", "--format", "json", cwd=repo).json()
    found = sorted((f["commit"], f["path"], f["rule"]) for f in report["findings"])
    # Each secret once, with the commit that added it: the side branch's own secret is not reported
    # again for the merge that brought it in.
    assert found == sorted([(side, "side.env", "npm-token"), (resolved, "app.py", "huggingface-token"),
                            (evil, "evil.env", "stripe-secret-key")])


def test_wired_into_the_broker_command(tree: tuple[Path, str]) -> None:
    """`broker scan` (the entry point users and CI call) behaves like `python -m broker.scan`."""
    import subprocess
    import sys

    root, secret = tree
    found = subprocess.run([sys.executable, "-m", "broker", "scan", "."], cwd=root, capture_output=True, text=True,
                           timeout=60)
    assert found.returncode == 1 and "app.py" in found.stdout and secret not in found.stdout + found.stderr
    clean = subprocess.run([sys.executable, "-m", "broker", "scan", "clean.py"], cwd=root, capture_output=True,
                           text=True, timeout=60)
    assert clean.returncode == 0


def test_a_hostile_repository_config_changes_nothing(repo: Path, token) -> None:
    # Committed or local git settings must neither blind the scan nor run commands: context lines
    # between hunks, files declared binary, a fsmonitor hook.
    (repo / "a.py").write_text("one = 1\ntwo = 2\nthree = 3\n")
    (repo / "deploy.cfg").write_text("x = 1\n")
    (repo / ".broker-scan.toml").write_text("[allowlist]\npaths = ['''^vendor/''']\n")
    os.makedirs(repo / "vendor")
    (repo / "vendor" / "v.py").write_text(f'GH = "{token("github-pat")}"\n')
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "base")
    hook = repo.parent / "hook.sh"
    marker = repo.parent / "hook-ran"
    hook.write_text(f"#!/bin/sh\ntouch {marker}\n")
    hook.chmod(0o755)
    git(repo, "config", "diff.interHunkContext", "10")
    git(repo, "config", "core.fsmonitor", str(hook))
    git(repo, "config", "core.bigFileThreshold", "1")
    (repo / ".gitattributes").write_text("*.cfg -diff\n")
    (repo / "a.py").write_text("one = 10\ntwo = 2\nthree = 30\n")
    (repo / "b.env").write_text(f"export API_TOKEN={token('npm-token')}\n")
    (repo / "deploy.cfg").write_text(f"x = 1\ntoken = {token('huggingface-token')}\n")
    git(repo, "mv", "vendor/v.py", "moved.py")  # out of the allowlisted path
    git(repo, "add", ".")
    marker.unlink(missing_ok=True)  # our own git commands may run the hook; the scanner must not
    found = sorted((f["path"], f["line"], f["rule"]) for f in run_scan("--staged", "--format", "json",
                                                                        cwd=repo).json()["findings"])
    assert found == [("b.env", 1, "npm-token"), ("deploy.cfg", 2, "huggingface-token"),
                     ("moved.py", 1, "github-pat")]
    assert not marker.exists()
    git(repo, "commit", "-qm", "more")
    marker.unlink(missing_ok=True)
    history = {(f["path"], f["rule"]) for f in run_scan("--history", "--format", "json", cwd=repo).json()["findings"]}
    assert {("b.env", "npm-token"), ("deploy.cfg", "huggingface-token"), ("moved.py", "github-pat")} <= history
    assert not marker.exists()


@pytest.mark.timeout(120)  # a hang guard: before possessive quantifiers these took minutes to hours
@pytest.mark.parametrize("text", ["secret_key" + "\n" * 16000, "twilio_token" + " " * 8000,
                                  "vault_token" + " " * 8000, "eyJ" * 340000,
                                  "-----BEGIN RSA PRIVATE KEY-----\n" * 30000])
def test_inputs_built_to_backtrack_finish(text: str, tmp_path: Path) -> None:
    assert run_scan("-", cwd=tmp_path, stdin=text).code == 0


def test_pgp_private_key_with_armor_headers(tmp_path: Path, rng) -> None:
    body = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/") for _ in range(256))
    key = ("-----BEGIN PGP PRIVATE KEY BLOCK-----\nVersion: GnuPG v2.0.22 (GNU/Linux)\n"
           "Comment: GPGTools - https://gpgtools.org\n\n" + "\n".join(body[i:i + 64] for i in range(0, 256, 64))
           + "\n=abcd\n-----END PGP PRIVATE KEY BLOCK-----\n")
    report = run_scan("-", "--format", "json", cwd=tmp_path, stdin=key).json()
    assert [f["rule"] for f in report["findings"]] == ["private-key"]


@pytest.mark.parametrize("entry", ['stopwords = [""]', "regexes = ['']", "paths = ['']"])
def test_an_empty_allowlist_entry_is_refused(tmp_path: Path, entry: str) -> None:
    (tmp_path / ".broker-scan.toml").write_text(f"[allowlist]\n{entry}\n")
    r = run_scan(".", cwd=tmp_path)
    assert r.code == 2 and "an empty entry would allow every finding" in r.err


def test_staged_skips_a_file_above_max_file_size_without_reading_it(repo: Path, token) -> None:
    # The large blob is a loose object cut short after its header: its size can be read, its content
    # cannot. Any attempt to read it fails the scan, so a passing scan proves the limit came first.
    (repo / ".broker-scan.toml").write_text("[scan]\nmax_file_size = 4096\n")
    (repo / "small.env").write_text(f"NPM={token('npm-token')}\n")
    content = (f'GH = "{token("github-pat")}"\n' + "x = 1\n" * 2000).encode()
    whole = b"blob %d\0" % len(content) + content
    oid = hashlib.sha1(whole).hexdigest()  # git names objects by SHA-1 of this exact byte string
    packed = zlib.compress(whole)
    objects = repo / ".git" / "objects" / oid[:2]
    objects.mkdir(parents=True, exist_ok=True)
    (objects / oid[2:]).write_bytes(packed[: len(packed) // 2])
    git(repo, "add", "small.env", ".broker-scan.toml")
    git(repo, "update-index", "--add", "--cacheinfo", f"100644,{oid},big.py")
    report = run_scan("--staged", "--format", "json", cwd=repo)
    assert report.code == 1, report.err
    assert [f["path"] for f in report.json()["findings"]] == ["small.env"]
    assert report.json()["stats"]["skipped"] == {"too-large": 1}


def test_staged_in_a_pre_commit_hook_reads_the_index_being_committed(repo: Path, token) -> None:
    # `git commit FILE` commits from a temporary index that git names in GIT_INDEX_FILE for its hooks;
    # the shadow must copy that index, not .git/index, or the secret would pass.
    (repo / "a.txt").write_text("one\n")
    git(repo, "add", ".")
    git(repo, "commit", "-qm", "base")
    hook = repo / ".git" / "hooks" / "pre-commit"
    root = Path(__file__).resolve().parents[2]
    hook.write_text(f"#!/bin/sh\nPYTHONPATH='{root}' exec '{sys.executable}' -m broker.scan --staged\n")
    hook.chmod(0o755)
    (repo / "a.txt").write_text(f"one\nNPM={token('npm-token')}\n")
    with pytest.raises(subprocess.CalledProcessError) as refused:
        git(repo, "commit", "-qm", "leak", "a.txt")
    assert "npm-token" in refused.value.stdout + refused.value.stderr
    (repo / "a.txt").write_text("one\ntwo\n")
    git(repo, "commit", "-qm", "clean", "a.txt")


def test_a_scan_of_ordinary_code_prints_nothing_from_the_regex_engine(tmp_path: Path) -> None:
    # With RE2's default memory budget the longest rules ran out of DFA cache on this project's own
    # sources, and RE2 wrote a line to stderr each time (hundreds per scan). The scan must stay quiet.
    package = Path(__file__).resolve().parents[2] / "broker"
    r = run_scan(str(package), cwd=tmp_path)
    assert r.code == 0, r.err
    assert "re2" not in r.err.lower() and "DFA" not in r.err, r.err[:500]
