"""The main job, end to end on this machine with the embedded defaults (no Vault, no other service):

1. write a config granting *this* uid and Python binary the ``support-summarize`` workflow,
2. start ``broker serve``,
3. start a toy tool server that verifies broker tokens offline,
4. run the example agent: it mints a token, calls the tool, and is refused a tool it lacks,
5. run an agent under the sidecar (`broker exec`), which only reads a credential file kept fresh for it,
6. show the audit log, stop everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

from broker.testing import WorkflowSpec, config_text, running_daemon

HERE = os.path.dirname(os.path.abspath(__file__))
TRUST_DOMAIN = "demo.example"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="broker-demo-") as d:
        workflows = [WorkflowSpec(
            "support-summarize", tenant="acme",
            # Kernel-checked: only processes of this uid running this Python binary match.
            callers=[{"uid": os.geteuid(), "exe": os.path.realpath(sys.executable)}],
            tools=[{"name": "read_ticket", "actions": ["ticket:read"],
                    "destinations": ["http://127.0.0.1/api/tickets/*"], "ttl": "2m"},
                   {"name": "send_email", "actions": ["email:send"], "ttl": "1m"}],
        )]
        cfg = os.path.join(d, "broker.toml")
        with open(cfg, "w") as f:
            f.write(config_text(d, workflows, trust_domain=TRUST_DOMAIN))
        print(f"demo: config written to {cfg}:\n")
        with open(cfg) as f:
            print(f.read())
        sock, audit = os.path.join(d, "broker.sock"), os.path.join(d, "audit.jsonl")
        with running_daemon(cfg, sock, audit) as daemon:
            print(f"demo: broker serving on {sock} (pid {daemon.proc.pid})")
            tool = subprocess.Popen([sys.executable, os.path.join(HERE, "toy_tool.py"), sock, TRUST_DOMAIN],
                                    stdout=subprocess.PIPE, text=True)
            try:
                assert tool.stdout is not None
                port = int(tool.stdout.readline().split()[1])
                print(f"demo: toy tool listening on 127.0.0.1:{port}\n")
                agent = subprocess.run([sys.executable, os.path.join(HERE, "agent.py"), sock,
                                        f"http://127.0.0.1:{port}"], check=False)
                print("\ndemo: the same agent, now launched by the sidecar: "
                      "broker exec --workflow support-summarize --tool read_ticket -- ...")
                sidecar = subprocess.run([sys.executable, "-m", "broker", "exec", "--socket", sock, "--workflow",
                                          "support-summarize", "--tool", "read_ticket", "--",
                                          sys.executable, os.path.join(HERE, "agent_from_file.py"),
                                          f"http://127.0.0.1:{port}"], check=False)
            finally:
                tool.terminate()
                tool.wait(10)
            print("\ndemo: audit log (metadata only, never a token):")
            with open(audit) as f:
                for line in f:
                    e = json.loads(line)
                    print(f"  {e['event']:<6} {e['decision']:<5} wf={e.get('workflow')} tool={e.get('tool')} "
                          f"pid={e.get('pid')} uid={e.get('uid')} reason={e.get('reason')}")
        print("\ndemo: broker stopped cleanly" if daemon.proc.returncode == 0 else "\ndemo: broker exit "
              f"{daemon.proc.returncode}")
        ok = agent.returncode == 0 and sidecar.returncode == 0 and daemon.proc.returncode == 0
        print("demo: OK" if ok else "demo: FAILED")
        if ok:
            # The demo ran from .venv: say how to use the same install for one's own setup.
            print("\nnext: `source .venv/bin/activate` puts `broker` on your PATH (or run .venv/bin/broker);\n"
                  "      README.md, \"Your own setup, as a normal user\", writes a config that needs no root")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
