"""The log-prob passes of a TRL GRPO step, TRL's fused head vs ``FastpoGRPOTrainer``'s (issue 17's head row).

``python -m benchmarks.trl_head [--prompts 8 --completions 4 --prompt-len 256 --completion-len 128]
[--hidden 896 --vocab 151936 --layers 1] [--micro-batch 8] [--threads 1] [--rounds 1]``

A random Llama (float32, untied head, ``--layers`` decoder layers) is saved to a temporary directory and each
implementation builds the real trainer on it in a fresh subprocess (its peak RSS is the child's
``ru_maxrss``): ``trl`` is ``trl.GRPOTrainer``, ``fastpo`` is ``fastpo.integrations.trl.FastpoGRPOTrainer``
(beta=0.04, so TRL loads a reference model from the path). Both run TRL's own
``_get_per_token_logps_and_entropies`` on the same ``prompts x completions`` sequences (left-padded
prompts, full-length completions), as a GRPO step does:

``reference pass``   ``ref_model``, ``torch.no_grad()``, chunks of ``--micro-batch`` sequences
                     (``_generate_and_score_completions``' call)
``policy pass``      ``model`` with ``compute_entropy=True``, forward + backward of the completion-masked
                     log-prob sum per micro-batch (``_compute_loss``' call; the GRPO loss is a function of the
                     log-probs, the entropy feeds its metric and mask)

TRL's head scores every position of the sequence; fastpo's only the completion tokens. The children write
their log-probs and entropies; the parent checks they agree (atol 1e-4) and that fastpo served every pass
(``fastpo.integrations.trl.STATS``). With ``--rounds`` > 1 the children alternate and times are medians.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List

IMPLS = ("trl", "fastpo")


def build_model(path: str, hidden: int, vocab: int, layers: int, seed: int = 0) -> None:
    """A random Llama of the given head size saved with fastpo's tokenizer (TRL needs a processing class)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastpo.trainer.tiny_model import build_tokenizer

    tok = build_tokenizer()
    heads = max(1, hidden // 64)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)


def make_batch(args, pad_id: int):
    """``prompts * completions`` sequences: left-padded prompts of random length <= prompt_len, full completions."""
    import torch

    g = torch.Generator().manual_seed(1)
    n, p, c = args.prompts * args.completions, args.prompt_len, args.completion_len
    ids = torch.randint(0, args.vocab, (n, p + c), generator=g)
    prompt_lens = torch.randint(p // 2, p + 1, (args.prompts,), generator=g).repeat_interleave(args.completions)
    mask = torch.ones(n, p + c, dtype=torch.long)
    for i, length in enumerate(prompt_lens.tolist()):
        mask[i, :p - length] = 0
    ids = ids.masked_fill(mask == 0, pad_id)
    return ids, mask


def child(args) -> Dict:
    import torch
    import trl
    from datasets import Dataset

    from fastpo.integrations import trl as ftrl

    torch.set_num_threads(args.threads)
    cls = trl.GRPOTrainer if args.impl == "trl" else ftrl.FastpoGRPOTrainer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    cfg = trl.GRPOConfig(output_dir=os.path.join(args.model, "out-" + args.impl), bf16=False, use_cpu=True,
                         per_device_train_batch_size=args.micro_batch, num_generations=args.completions,
                         gradient_accumulation_steps=args.prompts * args.completions // args.micro_batch,
                         max_completion_length=args.completion_len, beta=0.04, report_to="none",
                         save_strategy="no", seed=0, dataloader_num_workers=0)
    trainer = cls(model=args.model, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=cfg,
                  train_dataset=Dataset.from_dict({"prompt": ["1+2="] * args.prompts}), processing_class=tok)
    ids, mask = make_batch(args, tok.pad_token_id)
    keep = args.completion_len
    rss_ready = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ftrl.STATS.clear()

    t0 = time.perf_counter()
    with torch.no_grad():
        ref_logps, _, _ = trainer._get_per_token_logps_and_entropies(trainer.ref_model, ids, mask, keep,
                                                                     batch_size=args.micro_batch)
    t_ref = time.perf_counter() - t0

    model = trainer.model
    model.zero_grad(set_to_none=True)
    logps, ents = [], []
    t0 = time.perf_counter()
    for s in range(0, ids.size(0), args.micro_batch):
        mb_ids, mb_mask = ids[s:s + args.micro_batch], mask[s:s + args.micro_batch]
        lp, ent, _ = trainer._get_per_token_logps_and_entropies(model, mb_ids, mb_mask, keep, compute_entropy=True)
        (lp * mb_mask[:, -keep:]).sum().backward()
        logps.append(lp.detach())
        ents.append(ent.detach())
    t_policy = time.perf_counter() - t0
    grad = model.get_output_embeddings().weight.grad
    out = {"impl": args.impl, "ref_s": t_ref, "policy_s": t_policy, "rss_ready_kb": rss_ready,
           "rss_peak_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "stats": dict(ftrl.STATS),
           "head_grad_norm": float(grad.norm())}
    torch.save({"ref": ref_logps, "logps": torch.cat(logps), "entropy": torch.cat(ents)}, args.dump)
    return out


def run_child(args, impl: str, dump: str) -> Dict:
    cmd = [sys.executable, "-m", "benchmarks.trl_head", "--child", impl, "--model", args.model, "--dump", dump]
    for name in ("prompts", "completions", "prompt_len", "completion_len", "vocab", "micro_batch", "threads"):
        cmd += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("TRLHEAD ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{impl} child failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("TRLHEAD "):])


def check_dumps(dumps: Dict[str, str], atol: float = 1e-4) -> Dict[str, float]:
    import torch

    a, b = (torch.load(dumps[i]) for i in IMPLS)
    diffs = {k: float((a[k] - b[k]).abs().max()) for k in a}
    bad = {k: d for k, d in diffs.items() if not d <= atol}
    if bad:
        raise AssertionError(f"fastpo's passes differ from TRL's: {bad}")
    return diffs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--completions", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--completion-len", type=int, default=128)
    p.add_argument("--hidden", type=int, default=896)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--child", choices=IMPLS, help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--dump", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if (args.prompts * args.completions) % args.micro_batch:
        p.error("--micro-batch must divide prompts * completions")
    if args.child:
        args.impl = args.child
        print("TRLHEAD " + json.dumps(child(args)), flush=True)
        return 0

    from .harness import git_commit

    commit = git_commit()  # the code the children import (taken before they run)
    with tempfile.TemporaryDirectory(prefix="fastpo-trl-head-") as tmp:
        args.model = os.path.join(tmp, "model")
        build_model(args.model, args.hidden, args.vocab, args.layers)
        runs: Dict[str, List[Dict]] = {i: [] for i in IMPLS}
        dumps = {i: os.path.join(tmp, f"{i}.pt") for i in IMPLS}
        for _ in range(args.rounds):
            for impl in IMPLS:
                runs[impl].append(run_child(args, impl, dumps[impl]))
        diffs = check_dumps(dumps)
    served = runs["fastpo"][-1]["stats"]
    if any(k.startswith("delegated") for k in served) or not served.get("served:lm_head"):
        raise AssertionError(f"fastpo did not serve every pass: {served}")
    res = {"commit": commit, "load": os.getloadavg(), "shape": {k: getattr(args, k) for k in (
        "prompts", "completions", "prompt_len", "completion_len", "hidden", "vocab", "layers", "micro_batch",
        "threads")}, "max_abs_diff": diffs, "served": served}
    for impl in IMPLS:
        res[impl] = {"ref_s": statistics.median(r["ref_s"] for r in runs[impl]),
                     "policy_s": statistics.median(r["policy_s"] for r in runs[impl]),
                     "rss_peak_mb": max(r["rss_peak_kb"] for r in runs[impl]) / 1024,
                     "rss_ready_mb": max(r["rss_ready_kb"] for r in runs[impl]) / 1024}
    t, f = res["trl"], res["fastpo"]
    print(f"commit {res['commit']}  load {res['load']}  shape {res['shape']}")
    print("| pass | TRL | fastpo | TRL / fastpo |\n|---|---:|---:|---:|")
    print(f"| reference pass | {t['ref_s']:.1f} s | {f['ref_s']:.1f} s | {t['ref_s'] / f['ref_s']:.2f}x |")
    print(f"| policy fwd+bwd with entropy | {t['policy_s']:.1f} s | {f['policy_s']:.1f} s | "
          f"{t['policy_s'] / f['policy_s']:.2f}x |")
    print(f"| peak RSS (fastpo / TRL) | {t['rss_peak_mb']:.0f} MB | {f['rss_peak_mb']:.0f} MB | "
          f"{f['rss_peak_mb'] / t['rss_peak_mb']:.2f}x |")
    print(f"| peak RSS above the loaded trainer | {t['rss_peak_mb'] - t['rss_ready_mb']:.0f} MB | "
          f"{f['rss_peak_mb'] - f['rss_ready_mb']:.0f} MB | "
          f"{(f['rss_peak_mb'] - f['rss_ready_mb']) / max(t['rss_peak_mb'] - t['rss_ready_mb'], 1):.2f}x |")
    print(f"max |TRL - fastpo|: {diffs}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
