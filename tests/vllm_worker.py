"""Runs the vLLM engine checks in a process of their own (vLLM reconfigures logging, threads and the
global RNG of the process it runs in) and writes what it measured as JSON: ``python vllm_worker.py
MODEL_DIR OUT.json``. ``tests/test_vllm_rollout.py`` asserts on the numbers."""

import json
import sys

import torch


def trainer_logp(lm, rollout, temperature):
    """The trainer's log-probs of the rollout's sampled tokens (linear_token_logprobs on the policy)."""
    from fastpo.trainer.batch import TokenScorer, make_token_batch, packed_rollout_logp, token_logprobs

    scorer = TokenScorer(lm, temperature=temperature)
    batch = make_token_batch(rollout.prompt_ids, rollout.response_ids, 0, torch.device("cpu"))
    with torch.no_grad():
        ours = token_logprobs(scorer, batch)
    return ours, packed_rollout_logp(rollout.rollout_logp, "cpu")


def main(model_dir, out_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastpo.rollout.base import SamplingSettings, eos_ids_of
    from fastpo.rollout.vllm_engine import VLLMRollout

    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    threads = torch.get_num_threads()
    engine = VLLMRollout(model_dir, tok, eos_ids=eos_ids_of(lm, tok), kv_cache_gib=0.25)
    report = {"threads_kept": torch.get_num_threads() == threads}
    prompts = ["3+4=", "12-15=", "20+20=", "7-7="]

    # Sampling at T=1: grouping, EOS, and the sampled tokens' log-probs against the trainer's.
    s = SamplingSettings(n=4, temperature=1.0, max_new_tokens=6, seed=11)
    ro = engine.generate(prompts, s)
    ours, theirs = trainer_logp(lm, ro, 1.0)
    report["t1"] = {
        "group_index": ro.group_index,
        "prompt_ids_match": all(ro.prompt_ids[i] == tok(prompts[g], add_special_tokens=False)["input_ids"]
                                for i, g in enumerate(ro.group_index)),
        "eos_last_when_finished": all((r[-1] == tok.eos_token_id) == f for r, f in zip(ro.response_ids, ro.finished)),
        "lengths_match": [len(r) for r in ro.response_ids] == [len(x) for x in ro.rollout_logp],
        "max_abs_diff": float((ours - theirs).abs().max()),
        "completions": ro.completions,
    }
    again = engine.generate(prompts, s)
    other = engine.generate(prompts, SamplingSettings(n=4, temperature=1.0, max_new_tokens=6, seed=12))
    report["seeded_repeat"] = again.response_ids == ro.response_ids
    report["other_seed_differs"] = other.response_ids != ro.response_ids

    # Temperature 0.7: processed log-probs are log_softmax(z / 0.7), what the trainer scores at 0.7.
    ro = engine.generate(prompts, SamplingSettings(n=4, temperature=0.7, max_new_tokens=6, seed=3))
    ours, theirs = trainer_logp(lm, ro, 0.7)
    report["t07_max_abs_diff"] = float((ours - theirs).abs().max())
    # top-p 0.5: the sampled distribution is renormalised over the nucleus, so vLLM's log-probs are
    # never below the full distribution's.
    ro = engine.generate(prompts, SamplingSettings(n=4, temperature=1.0, top_p=0.5, max_new_tokens=6, seed=3))
    ours, theirs = trainer_logp(lm, ro, 1.0)
    report["top_p_min_gap"] = float((theirs - ours).min())
    report["top_p_mean_gap"] = float((theirs - ours).mean())
    # Greedy: one response per prompt, the argmax continuation.
    greedy = engine.generate(prompts, SamplingSettings(n=1, temperature=0.0, max_new_tokens=6))
    hf = [lm.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)[0, len(ids):].tolist() for ids in greedy.prompt_ids]
    report["greedy_matches_hf"] = all(hf_row[:len(r)] == r for hf_row, r in zip(hf, greedy.response_ids))

    # Weight sync: a fixed completion's log-probs under vLLM before and after an optimiser step.
    prompt_ids = [tok("9+8=", add_special_tokens=False)["input_ids"]]
    completion = [tok("17", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]]
    before_vllm = engine.score(prompt_ids, completion)[0]
    from fastpo.rollout.base import Rollout

    fixed_rollout = Rollout(prompt_ids, completion, [before_vllm], ["17"], [0], [True])
    before_trainer, _ = trainer_logp(lm, fixed_rollout, 1.0)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-4)
    from fastpo.trainer.batch import TokenScorer, make_token_batch, token_logprobs

    batch = make_token_batch(prompt_ids, completion, tok.pad_token_id, torch.device("cpu"))
    loss = -token_logprobs(TokenScorer(lm), batch).sum()  # one SFT step towards the fixed completion
    loss.backward()
    opt.step()
    stale_vllm = engine.score(prompt_ids, completion)[0]
    engine.sync_weights(lm)
    after_vllm = engine.score(prompt_ids, completion)[0]
    fixed_rollout.rollout_logp[0] = after_vllm
    after_trainer, _ = trainer_logp(lm, fixed_rollout, 1.0)
    report["sync"] = {
        "before_vllm": before_vllm, "before_trainer": before_trainer.tolist(),
        "stale_vllm": stale_vllm, "after_vllm": after_vllm, "after_trainer": after_trainer.tolist(),
    }
    # And generation after the sync samples from the new weights.
    ro = engine.generate(prompts, SamplingSettings(n=4, temperature=1.0, max_new_tokens=6, seed=5))
    ours, theirs = trainer_logp(lm, ro, 1.0)
    report["after_sync_max_abs_diff"] = float((ours - theirs).abs().max())
    engine.close()
    with open(out_path, "w") as fh:
        json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
