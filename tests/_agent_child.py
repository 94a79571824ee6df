"""A child for `broker exec` tests: prints what it sees as JSON lines on stdout.

argv: ENV_NAMES (comma separated) FILE_NAME EXIT_AFTER_SECONDS EXIT_CODE
It reports at start, on every SIGHUP, and on SIGTERM (then exits with EXIT_CODE).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time


def snapshot(event: str) -> None:
    d = os.environ.get("BROKER_CREDENTIALS_DIR", "")
    env_names = [n for n in sys.argv[1].split(",") if n]
    out: dict[str, object] = {"event": event, "pid": os.getpid(), "dir": d,
                              "env": {n: os.environ.get(n) for n in env_names}}
    try:
        out["files"] = sorted(os.listdir(d))
        with open(os.path.join(d, "generation")) as f:
            out["generation"] = int(f.read())
        if sys.argv[2] != "-":
            with open(os.path.join(d, sys.argv[2])) as f:
                out["token"] = f.read().strip()
    except OSError as exc:
        out["error"] = str(exc)
    print(json.dumps(out), flush=True)


def main() -> None:
    code = int(sys.argv[4])
    signal.signal(signal.SIGHUP, lambda *_: snapshot("hup"))

    def term(*_: object) -> None:
        print(json.dumps({"event": "term", "pid": os.getpid()}), flush=True)
        sys.exit(code)

    signal.signal(signal.SIGTERM, term)
    snapshot("start")
    deadline = time.monotonic() + float(sys.argv[3])
    while time.monotonic() < deadline:
        time.sleep(0.05)
    print(json.dumps({"event": "exit", "pid": os.getpid()}), flush=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
