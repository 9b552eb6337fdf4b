"""``kvtier bench security`` runs its TLS modes end to end: daemons started by ``kvtier serve``
with ``KVTIER_TLS__*``, clients with ``tls_*`` files, every path (figures are not checked)."""

from __future__ import annotations

from kvtier.lab.bench.security import MODES, OPS, measure


def test_tls_modes_measure_every_path() -> None:
    modes = [m for m in MODES if m.name in ("plain", "mtls")]
    res = measure(modes, page_kib=16, calls=2, rounds=1)
    assert {(r["mode"], r["op"]) for r in res["rows"]} == {
        (m.name, op) for m in modes for op in OPS}
    assert all(r["best_us"] > 0 for r in res["rows"])
