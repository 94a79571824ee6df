"""Load tool: N concurrent clients minting tokens over the socket, side by side with baselines.

One run measures, at each concurrency level, with the same load generator (bench/_loadgen.py, a separate
process, every client on its own connection):

* ``empty/direct``     an empty gRPC call (health Check) straight to the daemon's internal gRPC socket;
* ``empty/frontdoor``  the same call through the public socket (front door + pump);
* ``mint/frontdoor``   MintToken through the public socket (attestation, policy, ES256, audit);
* ``openbao/token``    OpenBao ``auth/token/create`` (a child token) on a real dev server, over HTTP;
* ``openbao/transit``  OpenBao ``transit/sign`` with an ECDSA P-256 key (the same primitive as ES256).

and prints requests/s, p50/p99 latency and CPU time per request of the server process (all its threads,
and its main thread alone) and of the load generator, plus the ratios the design targets are stated in:
mint vs the empty call of the same server (>= 0.8x), broker vs OpenBao (>= 5x), front door cost (<= 15%).

    .venv/bin/python bench/load.py [--duration 3] [--concurrency 1,8,32] [--no-openbao] [--json FILE]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import pwd
import subprocess
import sys
import tempfile

import hvac

from broker import _pump, tokens
from broker.testing import WorkflowSpec, config_text, openbao_dev_server, running_daemon

HERE = os.path.dirname(os.path.abspath(__file__))
# Agents normally run as their own user. As root, the clients of the public socket drop to "nobody",
# so the daemon attests a non-root caller (root callers take a slower, more careful /proc path).
AGENT_UID = (pwd.getpwnam("nobody").pw_uid, pwd.getpwnam("nobody").pw_gid) if os.geteuid() == 0 else None


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """User + system CPU time of a process (all threads), or of one of its threads, from /proc."""
    with open(f"/proc/{pid}/task/{thread}/stat" if thread else f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def loadgen(args: list[str], concurrency: int, duration: float, env: dict[str, str] | None = None,
            server_pid: int | None = None, python_server: bool = True, as_agent: bool = False) -> dict[str, float]:
    """Run bench/_loadgen.py once; its result plus CPU per request of ``server_pid`` when given.

    ``as_agent``: when root, the clients drop to the agents' user first (for the public socket).
    """
    if as_agent and AGENT_UID is not None:
        args = [*args, "--as-uid", str(AGENT_UID[0]), "--as-gid", str(AGENT_UID[1])]
    cpu0 = cpu_seconds(server_pid) if server_pid else 0.0
    # The main thread runs the event loop: every Python handler and grpc.aio's own per-call work.
    loop0 = cpu_seconds(server_pid, server_pid) if server_pid else 0.0
    r = subprocess.run([sys.executable, os.path.join(HERE, "_loadgen.py"), *args, "--concurrency",
                        str(concurrency), "--duration", str(duration)], capture_output=True, text=True,
                       env={**os.environ, **(env or {})}, check=False, timeout=duration + 120)
    if r.returncode != 0:
        raise RuntimeError(f"load generator failed: {r.stderr[-2000:]}")
    result: dict[str, float] = json.loads(r.stdout)
    if server_pid:
        # Includes connection set-up, so it slightly overstates the per-request cost.
        result["server_cpu_us"] = (cpu_seconds(server_pid) - cpu0) / max(result["completed"], 1) * 1e6
        if python_server:
            result["loop_cpu_us"] = (cpu_seconds(server_pid, server_pid) - loop0) / max(result["completed"], 1) * 1e6
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=3.0)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--no-openbao", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    levels = [int(x) for x in args.concurrency.split(",")]
    rows: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory(prefix="brk-bench-") as d:
        os.chmod(d, 0o755)  # the agents' user must reach the public socket
        cfg = os.path.join(d, "broker.toml")
        with open(cfg, "w") as f:
            uid = AGENT_UID[0] if AGENT_UID else os.geteuid()
            f.write(config_text(d, [WorkflowSpec("bench", callers=[{"uid": uid}],
                                                 tools=[{"name": "read_ticket", "ttl": "5m"}])]))
        sock = os.path.join(d, "broker.sock")
        with running_daemon(cfg, sock, os.path.join(d, "audit.jsonl")) as daemon, \
                (openbao_dev_server(d) if not args.no_openbao else _nothing()) as bao:
            if bao is not None:
                admin = hvac.Client(url=bao.address, token=bao.token)
                admin.sys.enable_secrets_engine("transit")
                admin.secrets.transit.create_key("bench", key_type="ecdsa-p256")
            internal_dir = next(n for n in os.listdir(d) if n.startswith(".broker-internal-"))
            internal = os.path.join(d, internal_dir, "grpc.sock")
            for c in levels:
                cells = {
                    "empty/direct": loadgen(["--grpc", f"unix:{internal}", "--rpc", "empty"], c, args.duration,
                                            server_pid=daemon.proc.pid),
                    "empty/frontdoor": loadgen(["--grpc", f"unix:{sock}", "--rpc", "empty"], c, args.duration,
                                               server_pid=daemon.proc.pid, as_agent=True),
                    "mint/frontdoor": loadgen(["--grpc", f"unix:{sock}", "--rpc", "mint"], c, args.duration,
                                              server_pid=daemon.proc.pid, as_agent=True),
                }
                if bao is not None:
                    env = {"BENCH_BAO_TOKEN": bao.token}
                    cells["openbao/token"] = loadgen(
                        ["--http", f"{bao.address}/v1/auth/token/create",
                         "--body", json.dumps({"ttl": "5m", "policies": ["default"]})], c, args.duration,
                        env=env, server_pid=bao.proc.pid, python_server=False)
                    cells["openbao/transit"] = loadgen(
                        ["--http", f"{bao.address}/v1/transit/sign/bench",
                         "--body", json.dumps({"input": base64.b64encode(b"x" * 200).decode()})],
                        c, args.duration, env=env, server_pid=bao.proc.pid, python_server=False)
                for name, cell in cells.items():
                    rows.append({"concurrency": c, "workload": name, **cell})
                    print(f"c={c:<3} {name:<16} {cell['rps']:8.0f}/s  p50 {cell['p50_us']:7.0f} us  "
                          f"p99 {cell['p99_us']:7.0f} us  errors {cell['errors']}  cpu/req server "
                          f"{cell.get('server_cpu_us', 0):5.0f} us client {cell['client_cpu_us']:5.0f} us", flush=True)
            log = daemon.log()
    print()
    print(markdown(rows, levels))
    print(f"\ndaemon backends: token engine {tokens.BACKEND}, pump {_pump.BACKEND} "
          f"({'ready' if 'ready' in log else 'no ready line'}); clients of the public socket run as uid "
          f"{AGENT_UID[0] if AGENT_UID else os.geteuid()}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def markdown(rows: list[dict[str, object]], levels: list[int]) -> str:
    def get(c: int, w: str) -> dict[str, object] | None:
        return next((r for r in rows if r["concurrency"] == c and r["workload"] == w), None)

    out = ["| clients | workload | req/s | p50 us | p99 us | errors | server CPU us/req | of which main thread "
           "| client CPU us/req |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        loop = f"{r['loop_cpu_us']:.0f}" if "loop_cpu_us" in r else "-"  # OpenBao is not a Python server
        out.append(f"| {r['concurrency']} | {r['workload']} | {r['rps']:.0f} | {r['p50_us']:.0f} | "
                   f"{r['p99_us']:.0f} | {r['errors']} | {r.get('server_cpu_us', 0):.0f} | {loop} | "
                   f"{r['client_cpu_us']:.0f} |")
    out += ["", "| clients | mint / empty (same server, front door) | front door cost (empty) | "
                "broker mint / OpenBao token | empty call / OpenBao token | broker mint / OpenBao transit sign | "
                "server CPU per request, OpenBao token / broker mint |", "|---:|---:|---:|---:|---:|---:|---:|"]
    for c in levels:
        mint, empty, direct, bao, transit = (get(c, w) for w in (
            "mint/frontdoor", "empty/frontdoor", "empty/direct", "openbao/token", "openbao/transit"))
        assert mint and empty and direct
        ratio = float(mint["rps"]) / float(empty["rps"])  # type: ignore[arg-type]
        cost = 1 - float(empty["rps"]) / float(direct["rps"])  # type: ignore[arg-type]
        vs_bao = f"{float(mint['rps']) / float(bao['rps']):.1f}x" if bao else "n/a"  # type: ignore[arg-type]
        # What no handler can beat on this server: the empty call's own rate against OpenBao's.
        ceiling = f"{float(empty['rps']) / float(bao['rps']):.1f}x" if bao else "n/a"  # type: ignore[arg-type]
        vs_transit = f"{float(mint['rps']) / float(transit['rps']):.1f}x" if transit else "n/a"  # type: ignore[arg-type]
        cpu = (f"{float(bao['server_cpu_us']) / float(mint['server_cpu_us']):.1f}x"  # type: ignore[arg-type]
               if bao else "n/a")
        out.append(f"| {c} | {ratio:.2f}x | {cost * 100:+.1f}% | {vs_bao} | {ceiling} | {vs_transit} | {cpu} |")
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
