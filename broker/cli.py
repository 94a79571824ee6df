"""``broker``: the command line. Each subcommand is a thin shell over the library."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Final

from broker import __version__, logs, tokens
from broker import config as config_mod
from broker.client import Client, resolve_socket
from broker.errors import BrokerError, ConfigError, InvalidToken, Refused


def _duration(text: str) -> int:
    try:
        return config_mod.parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _signal(text: str) -> int:
    name = text.upper() if text.upper().startswith("SIG") else "SIG" + text.upper()
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown signal {text!r}") from None


def _client_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--socket", help="daemon socket (default: $BROKER_SOCKET, the config's socket, "
                                    f"$SPIFFE_ENDPOINT_SOCKET, then {config_mod.DEFAULT_SOCKET})")
    p.add_argument("--config", help="read the socket path from this config file")


EXAMPLES: Final = """examples:
  broker config check broker.toml          validate a config (and warn about unknown users, groups, exes)
  broker serve --config broker.toml        run the daemon in the foreground
  broker whoami                            what the daemon sees of this process, which workflows match
  broker token --workflow W --tool T       print a token for tool T
  broker exec --workflow W -- ./agent.sh   run an agent with the workflow's credentials kept fresh
  broker scan --staged                     look for hardcoded secrets before committing

The socket comes from --socket, $BROKER_SOCKET, --config's [broker] socket, $SPIFFE_ENDPOINT_SOCKET,
then the default. `broker COMMAND --help` describes each command."""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="broker", description="Short-lived, scoped credentials for AI agents.",
                                 epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--version", action="version", version=f"broker {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the daemon in the foreground (logs to stderr)")
    p.add_argument("--config", required=True, help="TOML configuration file")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"],
                   help="the least severe messages to log (default: info)")
    p.add_argument("--log-format", default="auto", choices=["auto", "json", "text"],
                   help="auto: JSON unless stderr is a terminal")

    p = sub.add_parser("token", help="ask the daemon for a token; prints it on stdout")
    p.add_argument("--workflow", required=True, help="the workflow whose scope the token carries")
    p.add_argument("--tool", required=True, help="the tool the token is for")
    p.add_argument("--audience", default="", help="defaults to the tool name")
    p.add_argument("--ttl", type=_duration, default=0, help="e.g. 90s; at most the tool's ttl")
    _client_args(p)

    p = sub.add_parser("verify", help="verify a token; prints its claims as JSON")
    p.add_argument("--tool", required=True, help="the tool the token must be for")
    p.add_argument("--audience", default="", help="defaults to the tool name")
    p.add_argument("token", metavar="TOKEN", help="the token, or - to read it from stdin (keeps it out of argv)")
    _client_args(p)

    p = sub.add_parser("jwks", help="print the public keys that verify tokens (RFC 7517 JSON)")
    _client_args(p)

    p = sub.add_parser("exec", help="run COMMAND with the workflow's credentials delivered and kept fresh",
                       usage="broker exec --workflow W [--tool T ...] [--restart | --signal SIG] [--grace 10s] "
                             "[--refresh-fraction 0.5] [--wait-timeout 60s] -- COMMAND [ARGS...]")
    p.add_argument("--workflow", required=True, help="the workflow whose credentials COMMAND gets")
    p.add_argument("--tool", action="append", default=[], help="only these tools (repeatable; default: all)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--restart", action="store_true",
                      help="restart COMMAND when a credential delivered by environment variable changes")
    mode.add_argument("--signal", type=_signal, help="send this signal (e.g. HUP) after files change")
    p.add_argument("--grace", type=_duration, default=10, help="SIGTERM-to-SIGKILL grace on restart (default 10s)")
    p.add_argument("--refresh-fraction", type=float, default=0.5,
                   help="replace a credential at this fraction of its lifetime (default 0.5, with jitter)")
    p.add_argument("--wait-timeout", type=_duration, default=60,
                   help="how long to wait for the daemon before giving up (default 60s)")
    p.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARGS...]",
                   help="the command to run, after --")
    _client_args(p)

    p = sub.add_parser("status", help="summarise the daemon's state (root or the daemon's uid)")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    _client_args(p)

    p = sub.add_parser("reload", help="make the daemon re-read its config (root or the daemon's uid)")
    _client_args(p)

    p = sub.add_parser("whoami", help="what the daemon sees of this process: the selectors a caller block "
                                      "can match, and which workflows match")
    p.add_argument("--json", action="store_true", help="print the raw JSON")
    _client_args(p)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    c = csub.add_parser("check", help="validate a configuration file")
    c.add_argument("file", help="the TOML file to check")

    from broker.scan import cli as scan_cli

    p = sub.add_parser("scan", help="find hardcoded secrets in files, staged changes or history")
    scan_cli.add_arguments(p)
    return ap


def _client(args: argparse.Namespace) -> Client:
    return Client(resolve_socket(args.socket, args.config))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _config_problems(path: str, exc: ConfigError) -> None:
    for problem in exc.problems:
        # A problem without a key path is about the file itself and already names it.
        print(f"{path}: {problem}" if problem.path else str(problem), file=sys.stderr)


def _serve(args: argparse.Namespace) -> int:
    logs.setup(args.log_level, args.log_format)
    try:
        cfg = config_mod.load(args.config)
    except ConfigError as exc:
        _config_problems(args.config, exc)
        return 1
    for warning in config_mod.host_warnings(cfg):
        logging.getLogger("broker").warning("%s: %s", args.config, warning)
    from broker.daemon import serve

    serve(cfg, args.config)
    return 0


def _token(args: argparse.Namespace) -> int:
    with _client(args) as c:
        minted = c.mint(args.workflow, args.tool, audience=args.audience, ttl=args.ttl)
    sys.stdout.write(minted.token + "\n")
    return 0


def _verify(args: argparse.Namespace) -> int:
    token = sys.stdin.readline().strip() if args.token == "-" else args.token  # noqa: S105 - "-" means stdin
    with _client(args) as c:
        try:
            claims = c.verify(token, args.tool, audience=args.audience)
        except InvalidToken as exc:
            print(f"broker verify: invalid token: {exc.reason}", file=sys.stderr)
            return 1
    print(json.dumps(claims, indent=2, sort_keys=True))
    return 0


def _jwks(args: argparse.Namespace) -> int:
    with _client(args) as c:
        print(json.dumps(json.loads(c.jwks()), indent=2))
    return 0


def _exec(args: argparse.Namespace) -> int:
    from broker.sidecar import ExecOptions, run

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    if not argv:
        print("broker exec: no COMMAND given (put it after --)", file=sys.stderr)
        return 2
    if not 0.05 <= args.refresh_fraction <= 0.95:
        print("broker exec: --refresh-fraction must be between 0.05 and 0.95", file=sys.stderr)
        return 2
    logs.setup("info", "text")
    return run(ExecOptions(
        workflow=args.workflow, command=argv, tools=tuple(args.tool), restart=args.restart, signal=args.signal,
        grace=float(args.grace), refresh_fraction=args.refresh_fraction, wait_timeout=float(args.wait_timeout),
        socket=resolve_socket(args.socket, args.config)))


def _status(args: argparse.Namespace) -> int:
    with _client(args) as c:
        st = c.status()
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    keys = st["keys"]
    print(f"broker: up {st['uptime_seconds']:.0f}s, trust domain {st['trust_domain']}, "
          f"config {st['config_sha256'][:12]}")
    print(f"  backends: tokens {st['token_backend']}, pump {st['pump_backend']}")
    print(f"  signing key {keys['current']} (age {keys['current_age_seconds']:.0f}s), "
          f"{len(keys['published'])} published")
    print(f"  workflows: {', '.join(st['workflows']) or '(none)'}")
    print(f"  since start: {st['mints']} mints, {st['denials']} denials; {st['connections']} connections open, "
          f"{st['revoked_tokens']} revoked tokens")
    vault = st.get("vault")
    if vault:
        print(f"  vault: {vault}, {'degraded (below)' if st['degraded'] else 'healthy'}")
    else:
        print("  vault: not configured")
    print(f"  degraded: {'; '.join(st['degraded']) if st['degraded'] else 'no'}")
    return 0


def _whoami(args: argparse.Namespace) -> int:
    with _client(args) as c:
        me = c.whoami()
    if args.json:
        print(json.dumps(me, indent=2, sort_keys=True))
        return 0
    user = f" (user {me['user']})" if me["user"] else ""
    print("the broker daemon sees this process as:")
    print(f"  pid {me['pid']}, uid {me['uid']}{user}, gid {me['gid']}")
    print(f"  groups: {', '.join(me['groups']) or '(none with a name)'}")
    # The exe is the program the kernel runs: for `python agent.py` or a console script, the interpreter.
    print(f"  exe: {me['exe'] or '(none)'}")
    if me["exe_sha256"]:
        print(f"  exe_sha256: {me['exe_sha256']}")
    print(f"  systemd_unit: {me['systemd_unit'] or '(not in a systemd unit)'}")
    print(f"  workflows it matches: {', '.join(me['workflows']) or '(none)'}")
    # This process is the broker command, run by Python: another program shows its own exe. An agent
    # can ask for itself with Client().whoami().
    print("(an agent run as the same user under the same interpreter looks the same; any other program "
          "shows its own exe: ask from it with broker.client.Client().whoami())")
    return 0


def _reload(args: argparse.Namespace) -> int:
    with _client(args) as c:
        applied, problems, sha = c.reload()
    if applied:
        print(f"reloaded: config sha256 {sha[:12]}")
        return 0
    for p in problems:
        print(f"broker reload: refused: {p}", file=sys.stderr)
    print(f"broker reload: the config in force is still {sha[:12]}", file=sys.stderr)
    return 1


def _config_check(args: argparse.Namespace) -> int:
    try:
        cfg = config_mod.load(args.file)
    except ConfigError as exc:
        _config_problems(args.file, exc)
        return 1
    # Not errors: a rule naming an account or binary that does not exist yet matches nothing.
    for warning in config_mod.host_warnings(cfg):
        print(f"{args.file}: warning: {warning}", file=sys.stderr)
    tools = sum(len(wf.tools) for wf in cfg.workflows.values())
    print(f"{args.file}: ok ({_plural(len(cfg.workflows), 'workflow')}, {_plural(tools, 'tool')}, "
          f"sha256 {cfg.sha256[:12]})")
    print(f"{args.file}: {_algorithms(cfg.broker.algorithm)}")
    return 0


def _algorithms(alg: str) -> str:
    svid = tokens.svid_algorithm(alg)
    if svid == alg:
        return f"tool tokens and JWT-SVIDs are signed with {alg}"
    return (f"tool tokens are signed with {alg}; JWT-SVIDs (SPIFFE Workload API) with a separate {svid} key, "
            f"since the JWT-SVID standard allows no {alg}; the JWKS publishes both keys, SPIFFE bundles only "
            f"the {svid} ones")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handlers = {"serve": _serve, "token": _token, "verify": _verify, "jwks": _jwks, "config": _config_check,
                "status": _status, "reload": _reload, "exec": _exec, "whoami": _whoami}
    if args.command == "scan":
        from broker.scan import cli as scan_cli

        return scan_cli.run(args)
    try:
        return handlers[args.command](args)
    except ConfigError as exc:
        # Only a --config file read for its socket path gets here: serve and config check report their own.
        _config_problems(args.config, exc)
        return 1
    except BrokerError as exc:
        print(f"broker {args.command}: {exc}", file=sys.stderr)
        if isinstance(exc, Refused) and exc.request_id:
            print(f"broker {args.command}: {exc.where_to_look}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
