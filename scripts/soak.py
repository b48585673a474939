#!/usr/bin/env python3
"""Soak the daemon on the namespace test bed (root), before a release; not part of the default run.

    python scripts/soak.py [--only volumes|flap|late] [--minutes 10] [--rate 2] [--flap-s 30] [--late-min 5]

Three parts, all by default:

- ``volumes``: the fault tests of ``tests/volumes.py`` (``SOAK_TESTS``) at their soak volumes
  (``PRISM_SOAK=1``): 10,000 fuzz payloads, a 2,000-job burst, a peer SIGKILLed mid-job 50
  times, the coordinator 10 times, a 120 s broker outage under a 10 s watchdog, each one-packet
  kill 100 times, 2,000 large results (500 during an outage), 70,000 connects to each GLOO
  port at the unit's descriptor limit. The default test run has the same tests at smaller
  volumes. Fails when pytest does.
- ``flap``: a steady job stream to h0 (with the broker) on a 3-host bed while peer h1 flaps,
  half the jobs asking for a distributed run; every ``--flap-s`` seconds h1 is SIGKILLed and
  restarted, or its link is cut and restored, alternately. At the end it reports lost jobs
  (published, never answered: must be 0) and h0's RSS growth from the end of the warm-up to
  the end (must stay under 5 %), and fails when either does.
- ``late``: two hosts with a cluster secret. h0 starts alone; h1 starts ``--late-min``
  minutes later, when h0's first signed advert is long past its 150 s life, and must admit h0
  over mDNS (and h0 it) within a minute; both run on to ``--minutes`` and must log no
  ``*_task_failed`` and no ``loop_crashed``.

Exits 1 when a part fails, 2 when no bed can run here.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.bed import REPO, Testbed, TestbedError, bed_with_agents, exit_on_sigterm, netns_unavailable, rss_kib
from tests.volumes import SOAK_ENV, SOAK_TESTS

WARMUP_S = 30.0
#: A soak-volume test may take far longer than the default run's per-test timeout.
TEST_TIMEOUT_S = 3600


def flap(bed: Testbed, n: int, cut_s: float) -> str:
    """One flap of h1: kill and restart (even n) or cut and restore its link (odd n)."""
    if n % 2 == 0:
        bed.stop("h1", signal.SIGKILL)
        bed.start_agent(1)
        return "killed and restarted"
    bed.cut(1)
    time.sleep(cut_s)
    bed.restore(1)
    return f"link cut for {cut_s:.0f} s"


def volumes() -> int:
    """The fault tests at their soak volumes, in a pytest of their own: its exit status."""
    env = {**os.environ, SOAK_ENV: "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "pytest", *SOAK_TESTS, "-s", "-ra", f"--timeout={TEST_TIMEOUT_S}", "--durations=0"]
    print(f"soak: the fault tests at soak volume ({SOAK_ENV}=1): {len(SOAK_TESTS)} tests or modules", flush=True)
    return subprocess.run(cmd, cwd=REPO, env=env, check=False).returncode


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()  # a killed run takes its bed down
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["volumes", "flap", "late"], default=None, help="run one part (default: all)")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--rate", type=float, default=2.0, help="jobs per second")
    p.add_argument("--flap-s", type=float, default=30.0, help="seconds between flaps of h1")
    p.add_argument("--cut-s", type=float, default=5.0, help="how long a link cut lasts")
    p.add_argument("--rss-limit", type=float, default=5.0, help="allowed RSS growth of h0, percent")
    p.add_argument("--late-min", type=float, default=5.0, help="late: minutes before h1 starts")
    ns = p.parse_args(argv)
    reason = netns_unavailable()
    if reason:
        print(f"soak: test bed unavailable: {reason}", file=sys.stderr)
        return 2
    failed = False
    if ns.only in (None, "volumes"):
        code = volumes()
        print("soak: volumes OK" if code == 0 else f"soak: volumes FAIL (pytest exit {code})", flush=True)
        failed |= code != 0
    if ns.only in (None, "flap"):
        failed |= flap_stream(ns) != 0
    if ns.only in (None, "late"):
        failed |= late_peer(ns) != 0
    return 1 if failed else 0


def flap_stream(ns: argparse.Namespace) -> int:
    """The job stream while h1 flaps: 0 when no job was lost, RSS stayed flat and h0 lived."""
    duration = ns.minutes * 60
    with bed_with_agents(3, cluster="soak") as bed:
        pid = bed.procs["h0"].pid
        stream_cmd = [sys.executable, "-m", "testbed.clients", "stream", "--host", bed.address(0)]
        stream_cmd += ["--cluster", bed.cluster, "--node", "h0", "--rate", str(ns.rate), "--duration", str(duration)]
        out_path = bed.workdir / "stream.json"
        with out_path.open("wb") as out:
            client = subprocess.Popen(bed.run(0, *stream_cmd), cwd=REPO, stdout=out)
        start = time.monotonic()
        print(f"soak: {ns.minutes:g} min, {ns.rate:g} jobs/s to h0, h1 flaps every {ns.flap_s:g} s", flush=True)
        time.sleep(WARMUP_S)
        rss_start = rss_kib(pid)
        flaps = 0
        while time.monotonic() - start < duration - ns.flap_s and client.poll() is None:
            time.sleep(max(0.0, start + WARMUP_S + (flaps + 1) * ns.flap_s - time.monotonic()))
            what = flap(bed, flaps, ns.cut_s)
            flaps += 1
            print(f"  {time.monotonic() - start:6.0f} s  h1 {what}; h0 RSS {rss_kib(pid) / 1024:.0f} MiB", flush=True)
        client.wait(timeout=duration + 300)
        rss_end = rss_kib(pid)
        summary = json.loads(out_path.read_text())
        alive = bed.alive("h0")
    growth = 100.0 * (rss_end - rss_start) / rss_start
    lost = summary["lost"]
    print(
        f"soak: {summary['sent']} jobs, {summary['answered']} answered, {len(lost)} lost; results {summary['codes']}; "
        f"{summary['distributed']} distributed, {summary['fallback']} fell back; latency p50 {summary['p50_s']:.3f} s, "
        f"max {summary['max_s']:.1f} s; {flaps} flaps of h1"
    )
    print(
        f"soak: h0 RSS {rss_start / 1024:.1f} -> {rss_end / 1024:.1f} MiB ({growth:+.2f} %, limit {ns.rss_limit:g} %)"
    )
    failed = []
    if lost:
        failed.append(f"{len(lost)} jobs lost (first: {lost[:5]})")
    if growth >= ns.rss_limit:
        failed.append(f"RSS grew {growth:.2f} %")
    if not alive:
        failed.append("h0 died")
    print("soak: FAIL: " + "; ".join(failed) if failed else "soak: OK")
    return 1 if failed else 0


def late_peer(ns: argparse.Namespace) -> int:
    """A peer that starts minutes after h0 admits it over mDNS; neither logs a failed task."""
    bed = Testbed(2, cluster="late", models=["bert=tiny-bert"]).up()
    try:
        secret = bed.workdir / "secret"
        secret.write_text(os.urandom(24).hex())
        secret.chmod(0o600)
        env = {"PRISM_SECRET_FILE": str(secret)}
        bed.start_broker()
        start = time.monotonic()
        bed.start_agent(0, env=env)
        print(f"soak: late: h0 alone for {ns.late_min:g} min (with a secret), then h1", flush=True)
        time.sleep(max(0.0, start + ns.late_min * 60 - time.monotonic()))
        bed.start_agent(1, env=env)
        joined = time.monotonic()
        admitted = True
        try:
            bed.wait_cluster(["h0", "h1"], timeout_s=60)
            print(f"soak: late: h0 and h1 admitted each other {time.monotonic() - joined:.1f} s after h1 started")
        except TestbedError as exc:
            admitted = False
            print(f"soak: late: not admitted in 60 s: {exc}")
        time.sleep(max(0.0, start + ns.minutes * 60 - time.monotonic()))
        bad = {
            key: [ln for ln in bed.log(key).splitlines() if "_task_failed" in ln or '"loop_crashed"' in ln]
            for key in ("h0", "h1")
        }
        alive = all(bed.alive(key) for key in ("h0", "h1"))
        via_mdns = [ln for ln in bed.log("h1").splitlines() if '"peer_seen"' in ln and '"mdns"' in ln and '"h0"' in ln]
    finally:
        bed.down()
    failed = [] if admitted else ["h1 did not admit h0"]
    failed += [] if via_mdns else ["h1 never admitted h0 over mDNS"]
    failed += [f"{key} logged {len(lines)} failures (first: {lines[0][:200]})" for key, lines in bad.items() if lines]
    failed += [] if alive else ["an agent died"]
    print(f"soak: late: {ns.minutes:g} min; h1 admitted h0 over mDNS: {via_mdns[0][:160] if via_mdns else 'never'}")
    print("soak: late FAIL: " + "; ".join(failed) if failed else "soak: late OK")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
