"""Two volumes for the fault tests: one small enough for every run, and the soak volume that
``scripts/soak.py`` runs before a release (it sets ``PRISM_SOAK=1`` and runs the same tests).

Each test keeps its failure mode at both volumes; only the count (of payloads, jobs, kills,
seconds of outage) grows. The soak volumes are the ones the issues reported on.
"""

from __future__ import annotations

import os

SOAK_ENV = "PRISM_SOAK"

#: The tests whose volume grows under ``PRISM_SOAK=1`` (pytest node ids, without parameters).
SOAK_TESTS = (
    "tests/test_faults.py::test_fuzz_of_malformed_payloads",
    "tests/test_faults.py::test_burst_of_jobs",
    "tests/test_faults.py::test_peer_sigkilled_mid_job_again_and_again",
    "tests/test_node_faults.py::test_a_coordinator_sigkilled_mid_job_again_and_again_answers_every_job_once",
    "tests/test_node_faults.py::test_a_broker_outage_misses_no_watchdog_and_loses_no_job",
    "tests/test_node_faults.py::test_the_two_one_packet_kills_again_and_again",
    "tests/test_node_faults.py::test_large_results_some_during_an_outage_stay_within_the_memory_budget",
    "tests/test_gloo_flood.py",
    "tests/test_daemon.py::test_ready_before_any_broker_and_jobs_once_one_appears",
)


def soak() -> bool:
    """Whether this run is the soak (``PRISM_SOAK=1``)."""
    return os.environ.get(SOAK_ENV) == "1"


def volume(default: int, soak_volume: int) -> int:
    """``default`` in an ordinary run, ``soak_volume`` in the soak."""
    return soak_volume if soak() else default
