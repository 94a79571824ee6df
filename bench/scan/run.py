"""Benchmark `broker scan` against gitleaks and detect-secrets on the same corpora, side by side.

Corpora are built at run time in a temporary directory, never committed:

- positives: fake credentials in every provider format and file syntax (broker.scan.fakes), labelled;
- no-secret: the Python standard library sources of this machine (tests and site-packages excluded).

Reported per tool: recall on the positives (a labelled line counts when the tool reports any finding
covering it), files alarmed in the no-secret corpus, and throughput on the no-secret corpus as the
median, min and max of several wall-clock runs (process start included, as a user sees it).

    python bench/scan/run.py [--runs 5] [--stdlib DIR] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from broker.scan import fakes

Hits = dict[str, list[tuple[int, int, str]]]  # relative path -> (start line, end line, rule)


def copy_stdlib(src: Path, dst: Path) -> int:
    total = 0
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src)
        if rel.parts[0] in ("test", "site-packages", "dist-packages", "idlelib") or "tests" in rel.parts:
            continue
        if path.is_symlink():
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        total += target.stat().st_size
    return total


def run_broker(corpus: Path, out: Path) -> Hits:
    subprocess.run([sys.executable, "-m", "broker.scan", str(corpus), "--format", "json", "--output", str(out)],
                   cwd=corpus, check=False, capture_output=True)
    hits: Hits = defaultdict(list)
    for f in json.loads(out.read_text())["findings"]:
        hits[f["path"]].append((f["line"], f["end_line"], f["rule"]))
    return hits


def run_gitleaks(corpus: Path, out: Path) -> Hits:
    subprocess.run(["gitleaks", "dir", str(corpus), "--no-banner", "--report-format", "json",
                    "--report-path", str(out), "--exit-code", "0", "--log-level", "error"],
                   check=True, capture_output=True)
    hits: Hits = defaultdict(list)
    for f in json.loads(out.read_text() or "[]"):
        rel = Path(f["File"]).resolve().relative_to(corpus.resolve()).as_posix()
        hits[rel].append((f["StartLine"], f["EndLine"], f["RuleID"]))
    return hits


def run_detect_secrets(corpus: Path, out: Path) -> Hits:
    proc = subprocess.run(["detect-secrets", "scan", "--all-files", "-n", "."], cwd=corpus, check=True,
                          capture_output=True, text=True)
    out.write_text(proc.stdout)
    hits: Hits = defaultdict(list)
    for rel, items in json.loads(proc.stdout)["results"].items():
        for item in items:
            hits[rel].append((item["line_number"], item["line_number"], item["type"]))
    return hits


TOOLS: dict[str, Callable[[Path, Path], Hits]] = {
    "broker scan": run_broker,
    "gitleaks 8.30.1": run_gitleaks,
    "detect-secrets 1.5.0": run_detect_secrets,
}


def recall(hits: Hits, labels: list[fakes.Label]) -> float:
    found = sum(any(s <= label.line <= e for s, e, _ in hits.get(label.path, [])) for label in labels)
    return found / len(labels)


def per_rule_recall(hits: Hits, labels: list[fakes.Label]) -> dict[str, float]:
    by_rule: dict[str, list[bool]] = defaultdict(list)
    for label in labels:
        ok = any(s <= label.line <= e and r == label.rule for s, e, r in hits.get(label.path, []))
        by_rule[label.rule].append(ok)
    return {rule: sum(v) / len(v) for rule, v in sorted(by_rule.items())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        pos, neg = work / "positives", work / "stdlib"
        pos.mkdir()
        neg.mkdir()
        labels, _ = fakes.build(pos, seed=0, per_rule=3)
        size = copy_stdlib(args.stdlib, neg)
        rows = []
        broker_rules: dict[str, float] = {}
        for name, tool in TOOLS.items():
            pos_hits = tool(pos, work / "pos.json")
            neg_hits = tool(neg, work / "neg.json")
            runs = args.runs if "detect" not in name else max(1, min(args.runs, 3))
            speeds = []
            for _ in range(runs):
                start = time.perf_counter()
                tool(neg, work / "neg.json")
                speeds.append(size / 1e6 / (time.perf_counter() - start))
            if name == "broker scan":
                broker_rules = per_rule_recall(pos_hits, labels)
            rows.append((name, recall(pos_hits, labels), sorted(neg_hits), speeds))
            print(f"{name}: done", file=sys.stderr)
    lines = [
        f"Positives: {len(labels)} labelled fake secrets for {len(broker_rules)} rules in 12 file syntaxes (seed 0). "
        f"No-secret corpus: {size / 1e6:.1f} MB of Python stdlib sources from {args.stdlib}. "
        f"{os.cpu_count()} cores.",
        "",
        "| tool | recall (positives) | files alarmed (no-secret) | MB/s median | MB/s min..max | speed vs gitleaks |",
        "|---|---|---|---|---|---|",
    ]
    gl_speed = statistics.median(next(r[3] for r in rows if r[0].startswith("gitleaks")))
    for name, rec, alarmed, speeds in rows:
        med = statistics.median(speeds)
        lines.append(f"| {name} | {rec:.1%} | {len(alarmed)} | {med:.1f} | {min(speeds):.1f}..{max(speeds):.1f} "
                     f"| {med / gl_speed:.2f}x |")
    lines += ["", "Files alarmed in the no-secret corpus:", ""]
    lines += [f"- {name}: {', '.join(alarmed) or 'none'}" for name, _, alarmed, _ in rows]
    macro = statistics.mean(broker_rules.values())
    worst = min(broker_rules.items(), key=lambda kv: kv[1])
    lines += ["", f"broker scan per-rule recall (rule id must match): macro {macro:.1%}, "
                  f"lowest {worst[0]} {worst[1]:.1%}", ""]
    lines += ["| rule | recall |", "|---|---|"] + [f"| {r} | {v:.1%} |" for r, v in broker_rules.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
