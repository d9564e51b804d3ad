"""`airlock status`: what it prints and its exit status for what the
gateway's health document and the vault's admin socket answer.  (The
answers themselves come from real processes in test_primary_loss,
test_gateway_workers and test_disk_full; here the mapping alone.)"""
from __future__ import annotations

from airlock.cli import status_report

HEALTHY_GATEWAY = {"status": "ok", "replication": "synchronous", "vault_connected": True, "last_seq": 7,
                   "primary_storage": "ok", "processes": [{"role": "leader", "pid": 1, "vault_link": "connected"}]}
HEALTHY_VAULT = {"last_seq": 7, "overlays": [{"name": "ov-1", "sealed": False, "bytes": 10, "chunks": 1,
                                              "records": 2}], "base": {"bytes": 0, "chunks": 0}}


def test_both_domains_healthy_exit_0():
    lines, code = status_report({"gateway": HEALTHY_GATEWAY, "vault": HEALTHY_VAULT})
    assert code == 0
    assert lines[0].startswith("gateway: ok") and any(l.startswith("vault:   up  last_seq=7") for l in lines)


def test_a_vault_that_failed_a_write_is_shown_failed_and_exits_1():
    failed = {**HEALTHY_VAULT, "failed": "OSError(28, 'No space left on device')"}
    lines, code = status_report({"gateway": HEALTHY_GATEWAY, "vault": failed})
    assert code == 1
    assert any(l.startswith("vault:   FAILED  last_seq=7") for l in lines), lines
    assert any("No space left on device" in l and "recovers in place" in l for l in lines), lines


def test_a_closed_vault_store_retrying_recovery_is_failed():
    lines, code = status_report({"vault": {"last_seq": 7, "failed": "OSError(5, 'EIO')", "overlays": []}})
    assert code == 1 and "FAILED" in lines[0]


def test_a_vault_that_is_down_or_answers_an_error_exits_1():
    for answer in ({"status": "down"}, {"status": "error", "error": "bad request"}):
        lines, code = status_report({"vault": answer})
        assert code == 1 and lines[0].startswith(f"vault:   {answer['status']}"), lines


def test_a_degraded_or_unreachable_gateway_exits_1():
    degraded = {**HEALTHY_GATEWAY, "status": "degraded", "degraded_reason": "primary storage failed"}
    lines, code = status_report({"gateway": degraded})
    assert code == 1 and any("DEGRADED: primary storage failed" in l for l in lines)
    _lines, code = status_report({"gateway": {"status": "down", "error": "connection refused"}})
    assert code == 1


def test_a_gateway_of_several_processes_shows_where_its_connections_are():
    procs = [{"role": "leader", "pid": 1, "vault_link": "connected", "connections": 3, "busy_connections": 1,
              "requests": 40},
             {"role": "worker", "pid": 2, "vault_link": "not connected", "connections": 2, "busy_connections": 2,
              "requests": 7}]
    lines, code = status_report({"gateway": {**HEALTHY_GATEWAY, "processes": procs}, "vault": HEALTHY_VAULT})
    assert code == 0
    assert "  connections: leader 1 3 open / 1 busy / 40 requests, worker 2 2 open / 2 busy / 7 requests" in lines
    lines, _code = status_report({"gateway": HEALTHY_GATEWAY, "vault": HEALTHY_VAULT})
    assert not any(l.startswith("  connections:") for l in lines)     # one process: nothing to place
