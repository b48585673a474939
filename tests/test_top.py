"""``prism-agent top`` without a broker: the recent jobs health carries, what the view keeps
(and, with a secret, refuses), how it renders, and its command-line errors."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import pytest
from rich.console import Console

from agent.cli.main import main
from agent.cli.top_view import ClusterView, render
from agent.cluster.admission import Admission
from agent.cluster.health import signed_identity, status_payload
from agent.cluster.trust import Trust
from agent.jobs.recent import RecentJobs
from engine.errors import FailureReason
from tests.test_recent_jobs import split_result
from transport.health import Health, LinkView, Load
from transport.localcluster import free_port
from transport.schema import Result

SECRET = b"a-cluster-secret-of-32-bytes-yes"
NOW = 1_800_000_000.0


def _health(node: str, adm: Admission, **over: Any) -> Health:
    fields: dict[str, Any] = {
        "node": node,
        "time": NOW - 2,
        "version": "0.1.0",
        "engine": 3,
        "load": Load(cpus=4, load1=0.5, queue=1),
        "models": ["bert"],
        "speed": {"bert": 0.0123},
        "peers": ["b"] if node == "a" else ["a"],
        "links": {
            "b" if node == "a" else "a": LinkView(rtt_ms=0.4, mbps=94.2, mbps_err=3.1, age_s=1.0, source="probe")
        },
        "admission": signed_identity(adm, node, "10.0.0.1", {"bert": 1.5}, 4242),
    }
    return Health(**{**fields, **over})


def test_the_view_lists_nodes_links_and_jobs_newest_first() -> None:
    view = ClusterView(Trust(Admission(None, "c")))
    open_adm = Admission(None, "c")
    recent = RecentJobs()
    recent.record(split_result("old"), NOW - 30)
    recent.record(split_result("new"), NOW - 1)
    view.status("a", b"online", NOW)
    view.health("a", _health("a", open_adm, recent=recent.items()).encode(), NOW)
    view.status("b", b"online", NOW)
    view.health("b", _health("b", open_adm).encode(), NOW)
    view.status("c", b"offline", NOW)
    view.health("zz", _health("a", open_adm).encode(), NOW)  # a document about another node: refused
    snap = view.snapshot("c", "mqtt://h:1883", NOW)
    assert [(n.node, n.status) for n in snap.nodes] == [("a", "online"), ("b", "online"), ("c", "offline")]
    a = snap.nodes[0]
    assert (a.load1, a.cpus, a.queue, a.engine, a.models, a.speed) == (0.5, 4, 1, 3, ("bert",), {"bert": 0.0123})
    assert a.health_age_s == 2.0
    assert snap.nodes[2].health_age_s is None
    assert [(k.node, k.peer, k.mbps, k.mbps_err) for k in snap.links] == [("a", "b", 94.2, 3.1), ("b", "a", 94.2, 3.1)]
    assert [(j.node, j.id) for j in snap.jobs] == [("a", "new"), ("a", "old")]
    assert snap.refused == 1
    assert json.loads(json.dumps(snap.to_dict()))["jobs"][0]["predicted_ms"] == 40.0


def test_with_a_secret_the_view_keeps_only_what_a_member_signed() -> None:
    now = time.time()  # signatures carry the wall clock
    view = ClusterView(Trust(Admission(SECRET, "c")))
    member, stranger, opened = (
        Admission(SECRET, "c"),
        Admission(b"another-secret-of-32-bytes-here!", "c"),
        Admission(None, "c"),
    )
    doc = _health("a", member, time=now)
    view.status("a", status_payload(Trust(member), "a", "online"), now)
    view.health("a", doc.encode(), now)
    view.status("x", b"online", now)  # plain words: anyone may publish them
    view.health("x", _health("x", opened, time=now).encode(), now)  # unsigned
    view.status("y", status_payload(Trust(stranger), "y", "online"), now)  # another cluster's secret
    view.health("y", _health("y", stranger, time=now).encode(), now)
    view.health("a", doc.encode(), now)  # the same again (a reconnect re-delivers retained ones): no news
    snap = view.snapshot("c", "mqtt://h:1883", now)
    assert [n.node for n in snap.nodes] == ["a"]
    assert snap.verified
    assert snap.refused == 4
    replay = doc.model_copy(update={"load": Load(cpus=4, load1=9.0)})  # its signature, another body's load
    view.health("a", replay.encode(), now)
    assert view.snapshot("c", "m", now).nodes[0].load1 == 0.5  # the old signature's sequence: refused


def test_the_view_renders_as_an_operator_reads_it() -> None:
    view = ClusterView(Trust(Admission(None, "lab")))
    adm = Admission(None, "lab")
    recent = RecentJobs()
    recent.record(split_result("job-split"), NOW - 3)
    recent.record(
        split_result("job-fb", mode="local", peers=(), fallback=True, fallback_reason=FailureReason.PEER_OFFLINE,
               decision={"option": "means@8", "predicted_ms": 30.0, "reason": "r",
                         "fallback_reason": "a peer of the run went offline"}),
        NOW - 2,
    )  # fmt: skip
    recent.record(Result.failure("job-bad", "unknown_model", "no model 'x'"), NOW - 1)
    view.status("a", b"online", NOW)
    view.health("a", _health("a", adm, recent=recent.items()).encode(), NOW)
    view.status("b", b"offline", NOW)
    console = Console(record=True, width=180, file=io.StringIO(), color_system=None)
    console.print(render(view.snapshot("lab", "mqtt://127.0.0.1:1883", NOW)))
    text = console.export_text()
    assert "cluster lab on mqtt://127.0.0.1:1883" in text
    assert "1/2 online" in text
    for shown in ("nodes", "links (as probed)", "recent jobs", "0.50/4", "v3", "bert 0.0123", "a → b", "94.2", "3.1"):
        assert shown in text, shown
    split = next(line for line in text.splitlines() if "job-split" in line)
    for shown in ("codes@8", "40.0", "50.0 1.25x", "0.99991"):  # predicted, measured and how far off
        assert shown in split, shown
    fallback = next(ln for ln in text.splitlines() if "job-fb" in ln)
    assert "fallback (peer_offline): a peer of the run went offline" in fallback
    assert "unknown_model" in next(ln for ln in text.splitlines() if "job-bad" in ln)

    empty = Console(record=True, width=100, file=io.StringIO())
    empty.print(render(ClusterView(Trust(adm)).snapshot("lab", "mqtt://h:1", NOW)))
    assert "no nodes in cluster 'lab' yet" in empty.export_text()


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["top", "--json"], "--json prints one snapshot: give --once with it"),
        (["top", "--interval", "0"], "argument --interval"),
        (["top", "--bogus"], "unrecognized arguments"),
    ],
)
def test_a_bad_top_command_line_is_one_error_line(
    argv: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        status = main(argv)
    except SystemExit as stop:  # argparse's own errors exit from inside the parser
        status = int(stop.code or 0)
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("prism-agent: error: ")
    assert says in err


def test_top_without_a_broker_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["top", "--once", "--broker", f"mqtt://127.0.0.1:{free_port()}"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("prism-agent: error: cannot reach the broker")
