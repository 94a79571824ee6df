"""The command line as a new user meets it: help, version, and the messages of common mistakes."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from broker import __version__, cli
from broker.testing import WorkflowSpec, config_text


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "broker", *args], capture_output=True, text=True, timeout=60)


def _flags_without_help(parser: argparse.ArgumentParser, name: str) -> list[str]:
    missing = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                missing += _flags_without_help(p, f"{name} {sub}")
        elif not action.help:
            missing.append(f"{name} {action.option_strings or action.dest}")
    return missing


def test_every_flag_of_every_command_has_help() -> None:
    assert _flags_without_help(cli._parser(), "broker") == []


def test_version_and_examples_in_the_top_level_help() -> None:
    assert run("--version").stdout.strip() == f"broker {__version__}"
    top = run("--help").stdout
    assert "examples:" in top and "broker whoami" in top and "broker exec --workflow W --" in top


def test_config_check_counts_in_words_and_warns_about_unknown_accounts(short_tmp: str) -> None:
    cfg = os.path.join(short_tmp, "broker.toml")
    with open(cfg, "w") as f:
        f.write(config_text(short_tmp, [WorkflowSpec("w", callers=[{"user": "no-such-user-q"}],
                                                     tools=[{"name": "t"}])]))
    r = run("config", "check", cfg)
    # A user created later is legitimate: warned, not refused.
    assert r.returncode == 0, r.stderr
    assert "(1 workflow, 1 tool, sha256 " in r.stdout
    assert f"{cfg}: warning: workflow[0].caller[0].user: no user 'no-such-user-q' on this host" in r.stderr


def test_a_toml_syntax_error_names_the_file_once(short_tmp: str) -> None:
    cfg = os.path.join(short_tmp, "broker.toml")
    with open(cfg, "w") as f:
        f.write("[broker\n")
    r = run("config", "check", cfg)
    assert r.returncode == 1 and r.stderr.count(cfg) == 1, r.stderr
    assert "invalid TOML" in r.stderr


def test_serve_names_the_file_of_a_config_error(short_tmp: str) -> None:
    cfg = os.path.join(short_tmp, "broker.toml")
    with open(cfg, "w") as f:
        f.write(config_text(short_tmp, [WorkflowSpec("w", callers=[{"uid": 0}], tools=[{"name": "t"}])]))
        f.write('[[workflow.tool]]\nname = "u"\nttl = 120\n')
    r = run("serve", "--config", cfg)
    assert r.returncode == 1
    assert f'{cfg}: workflow[0].tool[1].ttl: expected a duration string such as "90s"' in r.stderr, r.stderr


def test_a_client_config_error_names_the_file(short_tmp: str) -> None:
    cfg = os.path.join(short_tmp, "broker.toml")
    with open(cfg, "w") as f:
        f.write('[broker]\ntrust_domain = "example.org"\nsocket = "relative.sock"\n')
    r = run("whoami", "--config", cfg)
    assert r.returncode == 1
    assert f"{cfg}: broker.socket: must be an absolute path" in r.stderr, r.stderr
