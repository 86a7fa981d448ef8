"""The benchmark suite end to end: ``fastpo bench --quick`` on its smallest case prints the table,
writes the JSON (device, versions, commit, every figure) and a PNG plot; the correctness guard
refuses to time a wrong implementation; a missing peer is skipped with the reason."""

from __future__ import annotations

import json
import os

import pytest
import torch

from fastpo.cli import main as fastpo_main

pytest.importorskip("matplotlib")


def test_fastpo_bench_quick_smallest_case(tmp_path, capsys):
    out_json = tmp_path / "run.json"
    rc = fastpo_main(["bench", "--quick", "--ops", "logprobs", "--max-cases", "1", "--impls", "eager,fastpo",
                      "--device", "cpu", "--no-progress", "--json", str(out_json)])
    assert rc == 0
    stdout = capsys.readouterr().out
    assert "## fastpo benchmarks (quick, cpu)" in stdout
    assert "| case | impl | time ms (median)" in stdout
    assert "N=2048 V=32000 float32 fwd" in stdout
    rows = [line for line in stdout.splitlines() if line.startswith("|  | fastpo |")]
    assert rows and "FAILED" not in rows[0]

    payload = json.loads(out_json.read_text())
    info = payload["info"]
    for key in ("device", "device_name", "torch", "python", "commit", "date", "mode", "peers", "loadavg_start"):
        assert key in info, key
    assert info["device"] == "cpu" and info["mode"] == "quick"
    assert info["torch"] == torch.__version__
    recs = {r["impl"]: r for r in payload["ops"]["logprobs"]}
    assert set(recs) == {"eager", "fastpo"}
    for impl, rec in recs.items():
        assert rec["status"] == "ok", (impl, rec["detail"])
        assert rec["timing"]["median_ms"] > 0 and rec["timing"]["repeats"] >= 3
        assert rec["memory"] is not None and rec["memory"]["extra_peak_mib"] >= 0
        assert "logp err" in rec["check"]
    assert recs["eager"]["speedup_vs_eager"] == pytest.approx(1.0)
    assert recs["fastpo"]["speedup_vs_eager"] > 0 and recs["fastpo"]["memory_vs_eager"] >= 0

    assert payload["plots"], "no plot written"
    for path in payload["plots"]:
        assert os.path.getsize(path) > 1000
        with open(path, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_guard_refuses_to_time_a_wrong_result():
    from benchmarks.harness import run_op
    from benchmarks.policy import PolicyLossOp

    class WrongFastpo(PolicyLossOp):
        name = "policy-wrong"

        def cases(self, quick, device):
            return super().cases(quick, device)[:1]

        def outputs(self, impl, p, inputs):
            out = super().outputs(impl, p, inputs)
            if impl == "fastpo":
                out["grad"] = out["grad"] * 1.01
            return out

    records = run_op(WrongFastpo(), "cpu", quick=True, measure_memory=False, impl_filter=["eager", "fastpo"],
                     log=lambda msg: None)
    by_impl = {r.impl: r for r in records}
    assert by_impl["eager"].status == "ok" and by_impl["eager"].timing
    assert by_impl["fastpo"].status == "FAILED"
    assert by_impl["fastpo"].detail.startswith("wrong result")
    assert by_impl["fastpo"].timing is None and "speedup_vs_eager" not in by_impl["fastpo"].derived


def test_missing_peer_is_skipped_with_the_reason(monkeypatch):
    from benchmarks import peers

    monkeypatch.setitem(peers.PEERS, "nopeer", peers.Peer("nopeer", "fastpo_no_such_module", "no-such-dist"))
    monkeypatch.setattr(peers, "_import_cache", {})
    assert peers.skip_reason("nopeer", "cpu") == "no-such-dist not installed (pip install no-such-dist)"
    assert peers.status("cpu")["nopeer"]["available"] is False
    with pytest.raises(peers.Skip, match="not installed"):
        peers.require("nopeer", "cpu")
    assert "CUDA only" in peers.skip_reason("cce", "cpu")


def test_distill_op_checks_every_impl_against_the_float64_reference():
    """The opt-in ``distill`` op: each implementation's loss and student gradients agree with the reference on a
    tiny case, and a wrong gradient is caught by the op's own compare."""
    from benchmarks import get_op

    op = get_op("distill")
    p = op.tiny(op.cases(quick=True, device="cpu")[0])
    inputs = op.make_inputs(p, "cpu")
    ref = op.reference(p, inputs)
    for impl in op.impls(p, "cpu"):
        ok, msg = op.compare(ref, op.outputs(impl, p, inputs), p, "cpu")
        assert ok, (impl, msg)
    bad = op.outputs("fastpo", p, inputs)
    bad["grad_weight"] = bad["grad_weight"] * 1.01
    assert not op.compare(ref, bad, p, "cpu")[0]


def test_logprob_outputs_bench_checks_every_statistic(monkeypatch):
    """benchmarks.logprob_outputs: TRL's and fastpo's five statistics agree with eager's on a tiny case before
    any timing, and a wrong one is refused."""
    import benchmarks.logprob_outputs as bench

    inputs = bench.make_inputs(12, 8, 50, "cpu")
    bench.check(inputs)
    real = bench.compute

    def wrong(impl, hidden, weight, labels):
        out = real(impl, hidden, weight, labels)
        if impl == "fastpo-all":
            out["log_sum_sq_probs"] = out["log_sum_sq_probs"] + 0.1
        return out

    monkeypatch.setattr(bench, "compute", wrong)
    with pytest.raises(AssertionError, match="fastpo-all: log_sum_sq_probs"):
        bench.check(inputs)


def test_verl_surrogates_bench_prints_a_row_per_loss(capsys):
    """The issue-14 bar table's script runs verl's and fastpo's functions through verl's registry."""
    pytest.importorskip("verl.trainer.ppo.core_algos")
    from benchmarks.verl_surrogates import main

    assert main(["--B", "2", "--T", "64", "--repeats", "1", "--losses", "gpg,kl_cov,bypass_mode", "--float-mask"]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("| ") and ln.endswith("x |")]
    assert [r.split(" | ")[0][2:] for r in rows] == ["gpg", "kl_cov", "bypass_mode"]
    with pytest.raises(SystemExit):
        main(["--losses", "nope"])
