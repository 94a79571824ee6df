"""The ``broker scan`` command: options, source selection, report, exit code.

Exit codes: 0 nothing found, 1 findings, 2 usage, configuration or internal error.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections import Counter
from pathlib import Path
from typing import Final

from broker.errors import BrokerError
from broker.scan import baseline, config, engine, gitsource, report_json, report_sarif, report_text, sources
from broker.scan.errors import UsageError
from broker.scan.findings import Finding
from broker.scan.progress import Progress
from broker.scan.rules import ScanConfig

EXIT_CLEAN: Final = 0
EXIT_FINDINGS: Final = 1
EXIT_ERROR: Final = 2
DEFAULT_CONFIG: Final = ".broker-scan.toml"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help="files or directories (default: .); '-' reads standard input")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--staged", action="store_true", help="scan only the lines staged for commit")
    mode.add_argument("--history", action="store_true", help="scan the lines added by every commit")
    parser.add_argument("--since", metavar="REV", help="with --history: only commits after REV up to HEAD")
    parser.add_argument("--format", choices=("text", "json", "sarif"), default="text", help="report format")
    parser.add_argument("--output", metavar="FILE", type=Path, help="write the report to FILE")
    parser.add_argument("--baseline", metavar="FILE", type=Path,
                        help="a JSON report whose findings are accepted and not reported again")
    parser.add_argument("--config", metavar="FILE", type=Path,
                        help=f"rules and allowlists to add to the bundled ones (default: ./{DEFAULT_CONFIG})")
    parser.add_argument("--redact", action=argparse.BooleanOptionalAction, default=True,
                        help="show at most 4 characters of a secret in text output (default: on); "
                             "JSON and SARIF never contain secrets")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, metavar="N",
                        help="worker processes (default: number of cores)")


def _config(args: argparse.Namespace) -> ScanConfig:
    if args.config is not None:
        return config.load(args.config)
    default = Path(DEFAULT_CONFIG)
    return config.load(default if default.is_file() else None)


def _scan(args: argparse.Namespace, cfg: ScanConfig) -> tuple[list[Finding], engine.Stats]:
    progress = Progress()
    paths: list[str] = args.paths or ["."]
    if args.since is not None and not args.history:
        raise UsageError("--since needs --history")
    if args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    if "-" in paths:
        if len(paths) > 1 or args.staged or args.history:
            raise UsageError("'-' (standard input) cannot be combined with other sources")
        doc = sources.stdin(sys.stdin.buffer, cfg.max_file_size)
        stats = engine.Stats()
        if doc is None:
            stats.skipped["binary"] += 1
            return [], stats
        return engine.scan_documents([doc], cfg, 1, progress)
    if args.staged or args.history:
        if len(paths) > 1:
            raise UsageError("--staged and --history take at most one PATH: the repository")
        too_large: Counter[str] = Counter()
        docs = (gitsource.staged(paths[0], cfg.max_file_size, too_large) if args.staged
                else gitsource.history(paths[0], args.since))
        if args.history and not gitsource.remerge_supported():
            print("broker scan: git older than 2.36: merge commits' own changes are not scanned", file=sys.stderr)
        findings, stats = engine.scan_documents(docs, cfg, args.jobs, progress)
        stats.skipped.update(too_large)  # filled while the documents were read
        return findings, stats
    refs = list(sources.worktree(paths, os.getcwd()))
    return engine.scan_files(refs, cfg, args.jobs, progress)


def _render(args: argparse.Namespace, findings: list[Finding], stats: engine.Stats, cfg: ScanConfig) -> str:
    if args.format == "json":
        return report_json.render(findings, stats)
    if args.format == "sarif":
        return report_sarif.render(findings, cfg.rules)
    return report_text.render(findings, stats, redact=args.redact)


def _run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    accepted = baseline.load(args.baseline) if args.baseline is not None else frozenset()
    findings, stats = _scan(args, cfg)
    if args.baseline is not None:
        before = len(findings)
        findings = baseline.apply(findings, accepted)
        # Said on stderr so the report stays machine-readable: how much the baseline hid, and from what.
        print(f"broker scan: baseline {args.baseline} accepted {before - len(findings)} of {before} "
              f"finding{'' if before == 1 else 's'} ({len(accepted)} fingerprint{'' if len(accepted) == 1 else 's'} "
              "in the file)", file=sys.stderr)
    report = _render(args, findings, stats, cfg)
    if args.output is not None:
        args.output.write_text(report, encoding="utf-8")
    else:
        sys.stdout.write(report)
        sys.stdout.flush()
    if stats.skipped:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(stats.skipped.items()))
        print(f"broker scan: skipped {skipped}", file=sys.stderr)
    return EXIT_FINDINGS if findings else EXIT_CLEAN


def run(args: argparse.Namespace) -> int:
    """Run a scan from parsed arguments; returns the exit code (0 clean, 1 findings, 2 error)."""
    try:
        return _run(args)
    except BrokerError as exc:
        print(f"broker scan: {exc}", file=sys.stderr)
    except OSError as exc:
        print(f"broker scan: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("broker scan: interrupted", file=sys.stderr)
    except Exception:  # the contract: exit code 2 for any internal error, with the traceback
        traceback.print_exc()
        print("broker scan: internal error", file=sys.stderr)
    return EXIT_ERROR
