"""The adapter contract is enough: a third-party adapter runs in `compare` as a candidate."""

from __future__ import annotations

from conftest import run_by_candidate


def test_a_third_party_adapter_runs_in_compare(llmdiff_cli, mutants_on_path):
    name = "third_party_adapter:WrappedOracle"
    code, out, err, report = llmdiff_cli("compare", "gemma-7b", "--tiny", "--impl", name, "--dtype", "float32",
                                         "--no-diagnose", "--no-tokenizer-parity")
    assert code == 0, out + err
    impl = next(i for i in report["implementations"] if i["name"] == name)
    assert impl["ok"] and impl["versions"]["wrapped-oracle"] == "1.0" and impl["details"] == {"wraps": "oracle"}
    run = run_by_candidate(report, name, "float32")
    # The same program as the reference: every point bit for bit.
    assert run["verdict"] == "parity" and all(p["rel_l2"] == 0.0 for p in run["points"])
