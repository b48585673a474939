"""``prism-agent testbed``: build, shape, cut and tear down beds from a shell."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import uuid
from typing import Any

from testbed.bed import REPO, Testbed, TestbedError, UsageError, netns_unavailable, pid_alive


# -- prism-agent testbed ----------------------------------------------------------------------
def add_cli(sub: Any) -> None:
    """Add ``testbed`` and its subcommands to the ``prism-agent`` parser."""
    tb = sub.add_parser("testbed", help="a multi-host test bed on this box: namespaces, a broker, agents (root)")
    cmds = tb.add_subparsers(dest="testbed", required=True, parser_class=type(tb))
    up = cmds.add_parser("up", help="build a bed: N hosts, mosquitto on host 0, an agent on every host")
    up.add_argument("--hosts", type=_count, required=True, help="number of hosts (1-200)")
    up.add_argument("--model", default="tiny-bert", help="model every agent serves, as 'bert' (default tiny-bert)")
    up.add_argument("--rate", type=_rate, default=None, help="shape every host's link, e.g. 20mbit")
    up.add_argument("--tag", type=_tag, default=None, help="the bed's name (default: random)")
    up.add_argument("--cluster", type=_tag_like, default="tb", help="cluster name of the agents (default tb)")
    up.add_argument("--no-agents", action="store_true", help="only the namespaces and the broker")
    up.add_argument("--json", action="store_true", help="print the bed's status as JSON")
    sh_ = cmds.add_parser("shape", help="change a host's rate limit while running ('off' removes it)")
    sh_.add_argument("tag", type=_tag)
    sh_.add_argument("host", type=_host)
    sh_.add_argument("rate", type=_rate_or_off)
    for name, what in (("cut", "pull a host's cable (its switch port goes down)"), ("restore", "plug it back in")):
        c = cmds.add_parser(name, help=what)
        c.add_argument("tag", type=_tag)
        c.add_argument("host", type=_host)
    for name, what in (("kill", "SIGKILL a host's agent"), ("start", "(re)start a host's agent")):
        c = cmds.add_parser(name, help=what)
        c.add_argument("tag", type=_tag)
        c.add_argument("host", type=_host)
    st = cmds.add_parser("status", help="list beds: hosts, addresses, processes, shaping, cuts")
    st.add_argument("--json", action="store_true")
    dn = cmds.add_parser("down", help="tear a bed down: kill its processes, delete its namespaces")
    which = dn.add_mutually_exclusive_group(required=True)
    which.add_argument("tag", nargs="?", type=_tag)
    which.add_argument("--all", action="store_true", help="every bed not held by a running test (see --force)")
    dn.add_argument("--force", action="store_true", help="with --all: beds held by running tests too")
    ex = cmds.add_parser("exec", help="run a command on a host: testbed exec TAG HOST -- CMD...")
    ex.add_argument("tag", type=_tag)
    ex.add_argument("host", type=_host)
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    sm = cmds.add_parser("submit", help="prism-agent submit from host 0 to the bed's broker: submit TAG -- ARGS...")
    sm.add_argument("tag", type=_tag)
    sm.add_argument("args", nargs=argparse.REMAINDER)


def _count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 200:
        raise argparse.ArgumentTypeError(f"expected 1-200, got {text!r}")
    return int(text)


def _tag_like(text: str) -> str:
    if not text or len(text) > 64 or any(c in text for c in "/+# "):
        raise argparse.ArgumentTypeError(f"expected 1-64 characters without / + # or spaces, got {text!r}")
    return text


def _check_model(source: str) -> None:
    """Fail before building anything when no agent could load ``source``."""
    from pathlib import Path

    from engine.models import known_names

    if source in known_names() or Path(source).expanduser().is_dir():
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(source, "config.json"), str):
        return
    raise UsageError(
        f"unknown model '{source}': not a built-in ({', '.join(known_names())}), a directory, or in the hub cache"
    )


def _host(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"host must be a number (0 is the broker's), got {text!r}")
    return int(text)


def _tag(text: str) -> str:
    if not text or len(text) > 8 or not all(c.isalnum() for c in text):
        raise argparse.ArgumentTypeError(f"tag must be 1-8 letters or digits, got {text!r}")
    return text


def _rate(text: str) -> str:
    import re

    if not re.fullmatch(r"\d+(\.\d+)?([kmg]?(bit|bps))", text.lower()):
        raise argparse.ArgumentTypeError(f"rate must look like 20mbit, 500kbit or 1gbit, got {text!r}")
    return text.lower()


def _rate_or_off(text: str) -> str:
    return "off" if text.lower() == "off" else _rate(text)


def _bed(tag: str, host: int | None = None) -> Testbed:
    bed = Testbed.load(tag)
    if host is not None:
        bed._check_host(host)
    return bed


def _print_status(beds: list[Testbed], as_json: bool) -> None:
    rows: list[dict[str, Any]] = []
    for bed in beds:
        procs = {k: {"host": p.host, "pid": p.pid, "alive": pid_alive(p.pid, p.start)} for k, p in bed.procs.items()}
        rows.append(
            {
                "tag": bed.tag,
                "hosts": bed.hosts,
                "cluster": bed.cluster,
                "broker": bed.broker_url,
                "namespaces": bed.names,
                "addresses": [bed.address(i) for i in range(bed.hosts)],
                "rates": {str(k): v for k, v in bed.rates.items()},
                "cut": bed.cut_hosts,
                "held_by_test": bed.owner_alive(),
                "procs": procs,
            }
        )
    if as_json:
        print(json.dumps(rows))
        return
    if not rows:
        print("no test beds")
    for r in rows:
        print(f"{r['tag']}: {r['hosts']} hosts, cluster {r['cluster']}, broker {r['broker']}")
        for i in range(r["hosts"]):
            here = [
                f"{k}({'up' if v['alive'] else 'dead'} pid {v['pid']})" for k, v in r["procs"].items() if v["host"] == i
            ]
            link = ("cut" if i in r["cut"] else "up") + (f", {r['rates'][str(i)]}" if str(i) in r["rates"] else "")
            print(f"  host {i}  {r['namespaces'][i]}  {r['addresses'][i]}  link {link}  {' '.join(here)}")


def run_cli(ns: argparse.Namespace) -> int:
    """Run ``prism-agent testbed ...``; errors are one line and exit status 1 (2 for usage)."""
    try:
        return _run_cli(ns)
    except TestbedError as exc:
        print(f"prism-agent: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError) else 1


def _run_cli(ns: argparse.Namespace) -> int:
    cmd = ns.testbed
    if cmd == "up":
        _check_model(ns.model)  # before anything else: a typo should not cost a bed
    if cmd in ("up", "shape", "cut", "restore", "kill", "start", "down") and netns_unavailable():
        raise TestbedError(f"test bed unavailable: {netns_unavailable()}")
    if cmd == "up":
        bed = Testbed(ns.hosts, tag=ns.tag or uuid.uuid4().hex[:6], cluster=ns.cluster, models=[f"bert={ns.model}"])
        bed.up(detached=True)
        try:
            if ns.rate:
                for i in range(bed.hosts):
                    bed.shape(i, ns.rate)
            bed.start_broker()
            if not ns.no_agents:
                for i in range(bed.hosts):
                    bed.start_agent(i)
                print(f"waiting for {bed.hosts} agents to start and find each other ...", file=sys.stderr)
                bed.wait_cluster([f"h{i}" for i in range(bed.hosts)])
        except BaseException:
            bed.down()
            raise
        _print_status([bed], ns.json)
        if ns.json:
            return 0
        print(f"next: prism-agent testbed submit {bed.tag} -- --model bert --text hello --mode distributed")
        return 0
    if cmd == "status":
        _print_status([Testbed.load(t) for t in Testbed.tags()], ns.json)
        return 0
    if cmd == "down":
        tags = Testbed.tags() if ns.all else [ns.tag]
        for tag in tags:
            bed = Testbed.load(tag)
            if ns.all and bed.owner_alive() and not ns.force:
                print(f"{tag}: held by running process {bed.owner[0] if bed.owner else '?'}; kept (--force)")
                continue
            bed.down()
            print(f"{tag}: down")
        return 0
    bed = _bed(ns.tag, getattr(ns, "host", None))
    if cmd == "shape":
        bed.unshape(ns.host) if ns.rate == "off" else bed.shape(ns.host, ns.rate)
    elif cmd == "cut":
        bed.cut(ns.host)
    elif cmd == "restore":
        bed.restore(ns.host)
    elif cmd == "kill":
        bed.stop(f"h{ns.host}", signal.SIGKILL)
    elif cmd == "start":
        bed.start_agent(ns.host)
    elif cmd == "exec":
        argv = ns.cmd[1:] if ns.cmd[:1] == ["--"] else ns.cmd
        if not argv:
            print("prism-agent: error: testbed exec needs a command after --", file=sys.stderr)
            return 2
        return bed.exec(ns.host, *argv).returncode
    elif cmd == "submit":
        argv = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
        submit = [sys.executable, "-m", "agent", "submit", "--broker", bed.broker_url, "--cluster", bed.cluster]
        return bed.exec(0, *submit, *argv, cwd=REPO).returncode
    return 0
