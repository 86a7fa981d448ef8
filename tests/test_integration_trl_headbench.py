"""benchmarks/trl_head.py (the TRL GRPO log-prob passes benchmark) on a tiny case: both children run TRL's
own passes, their outputs agree, fastpo served them; the cross-check catches a wrong output."""

import json

import pytest
import torch

pytest.importorskip("trl")
pytest.importorskip("datasets")

from benchmarks import trl_head  # noqa: E402


def test_tiny_run(tmp_path):
    out = tmp_path / "res.json"
    assert trl_head.main(["--prompts", "2", "--completions", "2", "--prompt-len", "12", "--completion-len", "6",
                          "--hidden", "32", "--vocab", "300", "--micro-batch", "2", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["served"].get("served:lm_head", 0) >= 3  # 1 reference chunk pair + 2 policy micro-batches
    assert not any(k.startswith("delegated") for k in res["served"])
    assert all(d <= 1e-4 for d in res["max_abs_diff"].values())
    for impl in trl_head.IMPLS:
        assert res[impl]["ref_s"] > 0 and res[impl]["policy_s"] > 0 and res[impl]["rss_peak_mb"] > 0


def test_cross_check_catches_a_difference(tmp_path):
    dumps = {}
    for i, impl in enumerate(trl_head.IMPLS):
        dumps[impl] = str(tmp_path / f"{impl}.pt")
        torch.save({"ref": torch.zeros(2, 3) + i * 1e-3, "logps": torch.zeros(2, 3), "entropy": torch.zeros(2, 3)},
                   dumps[impl])
    with pytest.raises(AssertionError, match="ref"):
        trl_head.check_dumps(dumps)
