"""vLLM's processed log-probs under top-k / top-p against the trainer's truncated scoring, in a process
of its own (vLLM reconfigures the process it runs in): ``python vllm_truncated_worker.py MODEL_DIR OUT.json``.
``tests/test_vllm_truncated_scoring.py`` asserts on the numbers."""

import json
import sys

import torch


def main(model_dir, out_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import fastpo
    from fastpo.rollout.base import SamplingSettings, eos_ids_of
    from fastpo.rollout.vllm_engine import VLLMRollout
    from fastpo.trainer.batch import TokenScorer, make_token_batch, packed_rollout_logp, token_logprobs

    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    engine = VLLMRollout(model_dir, tok, eos_ids=eos_ids_of(lm, tok), kv_cache_gib=0.25)
    prompts = ["3+4=", "12-15=", "20+20=", "7-7=", "9+8="]
    report = {}
    for name, (temperature, top_k, top_p) in {"p09_k20": (0.9, 20, 0.9), "p09": (1.0, 0, 0.9),
                                               "k20": (1.0, 20, 1.0)}.items():
        ro = engine.generate(prompts, SamplingSettings(n=4, temperature=temperature, top_p=top_p, top_k=top_k,
                                                       max_new_tokens=8, seed=5))
        theirs = packed_rollout_logp(ro.rollout_logp, "cpu")
        batch = make_token_batch(ro.prompt_ids, ro.response_ids, 0, torch.device("cpu"))
        calls = {"n": 0}
        real = fastpo.ops.truncation.logits_thresholds

        def counted(*a, **kw):
            calls["n"] += 1
            return real(*a, **kw)

        with torch.no_grad():
            full = token_logprobs(TokenScorer(lm, temperature=temperature), batch)
            lin = sys.modules["fastpo.ops.linear_token_logprobs"]  # (the package's attribute is the function)
            lin.logits_thresholds = counted  # fastpo's own threshold pass must run
            try:
                cut = token_logprobs(TokenScorer(lm, temperature=temperature, top_k=top_k, top_p=top_p), batch)
            finally:
                lin.logits_thresholds = real
        report[name] = {"untruncated_gap_max": float((theirs - full).abs().max()),
                        "untruncated_gap_mean": float((theirs - full).mean()),
                        "truncated_gap_max": float((theirs - cut).abs().max()),
                        "tokens": int(theirs.numel()), "threshold_calls": calls["n"],
                        "all_finite": bool(torch.isfinite(cut).all())}
    with open(out_path, "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
