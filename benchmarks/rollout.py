"""Generation throughput of the trainer's two rollout backends: ``transformers`` ``generate`` on the
training model against a colocated ``vllm.LLM``, on the same randomly initialised Llama.

``python -m benchmarks.rollout [--device cpu|cuda] [--sizes small,medium] [--json PATH]``

Each size is a Llama config (layers, hidden, head_dim 64) with P prompts x n samples of exactly L new
tokens (EOS ignored on both sides, so both generate the same token count), sampled at temperature 1
with the sampled tokens' log-probs requested (what rollout needs). Timed: the median of ``--repeats``
calls after one warm-up call; reported: sampled tokens per second and the ratio to ``generate`` in
the same run. Not part of ``python -m benchmarks`` (whose cases check one result against eager
PyTorch: two samplers draw different tokens); needs vLLM (``bash scripts/install.sh --vllm``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Dict, List

import torch


@dataclass(frozen=True)
class RolloutSize:
    name: str
    layers: int
    hidden: int
    vocab: int
    prompts: int
    samples: int       # n per prompt
    prompt_len: int
    new_tokens: int


SIZES = {
    "tiny": RolloutSize("tiny", layers=1, hidden=64, vocab=64, prompts=2, samples=2, prompt_len=4, new_tokens=4),
    "small": RolloutSize("small", layers=2, hidden=256, vocab=4096, prompts=16, samples=8, prompt_len=16,
                         new_tokens=32),
    "medium": RolloutSize("medium", layers=4, hidden=512, vocab=32000, prompts=16, samples=8, prompt_len=32,
                          new_tokens=64),
    "large": RolloutSize("large", layers=16, hidden=2048, vocab=32000, prompts=64, samples=8, prompt_len=128,
                         new_tokens=256),
}


def build_model(size: RolloutSize, path: str, seed: int = 0) -> None:
    """A randomly initialised float32 Llama with ``size``'s shape, saved to ``path``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=size.vocab, hidden_size=size.hidden, intermediate_size=3 * size.hidden,
                         num_hidden_layers=size.layers, num_attention_heads=size.hidden // 64,
                         num_key_value_heads=size.hidden // 64, head_dim=64,
                         max_position_embeddings=size.prompt_len + size.new_tokens + 8, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="float32")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)


def prompt_ids(size: RolloutSize, seed: int = 0) -> List[List[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, size.vocab, (size.prompts, size.prompt_len), generator=gen).tolist()


def _median_time(fn, repeats: int) -> List[float]:
    fn()  # warm-up (vLLM's first call also allocates its sampler state)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def time_hf(path: str, size: RolloutSize, device: str, repeats: int) -> List[float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    ids = torch.tensor(prompt_ids(size), device=device)
    mask = torch.ones_like(ids)

    @torch.no_grad()
    def run():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                             top_k=0, num_return_sequences=size.samples, max_new_tokens=size.new_tokens,
                             min_new_tokens=size.new_tokens, pad_token_id=0, return_dict_in_generate=True,
                             output_scores=True)
        for i, scores in enumerate(out.scores):  # the sampled tokens' log-probs, as the HF engine reads them
            torch.log_softmax(scores.float(), -1).gather(-1, out.sequences[:, ids.shape[1] + i, None])
        return out

    return _median_time(run, repeats)


def time_vllm(path: str, size: RolloutSize, device: str, repeats: int) -> List[float]:
    from fastpo.rollout.vllm_engine import import_vllm

    vllm = import_vllm()
    kwargs = dict(model=path, skip_tokenizer_init=True, dtype="float32", seed=0, enforce_eager=True,
                  logprobs_mode="processed_logprobs", max_model_len=size.prompt_len + size.new_tokens + 8)
    if device == "cpu":
        kwargs["kv_cache_memory_bytes"] = 1 << 30
    else:
        kwargs["gpu_memory_utilization"] = 0.5
    llm = vllm.LLM(**kwargs)
    params = vllm.SamplingParams(n=size.samples, temperature=1.0, max_tokens=size.new_tokens, ignore_eos=True,
                                 logprobs=0, seed=0, detokenize=False)
    requests = [{"prompt_token_ids": p} for p in prompt_ids(size)]
    return _median_time(lambda: llm.generate(requests, params, use_tqdm=False), repeats)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.rollout", description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="small,medium", help=f"comma-separated, from {', '.join(SIZES)}")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None, metavar="PATH", help="also write every figure here")
    args = ap.parse_args(argv)
    names = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in names if s not in SIZES]
    if unknown:
        ap.error(f"unknown size {unknown[0]!r}; choose from {', '.join(SIZES)}")
    from .harness import device_info

    info = device_info(args.device)
    results: List[Dict] = []
    print(f"{info['device_name']} ({args.device}); torch {info['torch']}; commit {info['commit']}; {info['date']}; "
          f"load {info['loadavg_start']}\n")
    print("| size | layers x hidden, vocab | P x n x L tokens | backend | time s (median) | tokens/s | vs generate |")
    print("|---|---|---|---|---:|---:|---:|")
    for name in names:
        size = SIZES[name]
        with tempfile.TemporaryDirectory(prefix=f"fastpo-rollout-{name}-") as path:
            build_model(size, path)
            row = {"size": asdict(size)}
            for backend, timer in (("generate", time_hf), ("vllm", time_vllm)):
                times = timer(path, size, args.device, args.repeats)
                row[backend] = times
            tokens = size.prompts * size.samples * size.new_tokens
            base = statistics.median(row["generate"])
            for backend in ("generate", "vllm"):
                med = statistics.median(row[backend])
                print(f"| {name} | {size.layers} x {size.hidden}, {size.vocab} | {size.prompts} x {size.samples} x "
                      f"{size.new_tokens} = {tokens} | {backend} | {med:.3f} | {tokens / med:,.0f} | "
                      f"{base / med:.2f}x |", flush=True)
            results.append(row)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({**info, "results": results}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
