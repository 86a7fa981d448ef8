"""The training loop every algorithm shares: set-up, the optimiser step, logging, checkpoints.

Per step: ``experience = algo.experience(step)`` (rollout, rewards, old-policy and reference
log-probs, advantages), then ``epochs_per_step`` passes over it, each of ``mini_batches`` optimiser
steps: ``loss = algo.loss(micro_batch)`` and backward for each ``micro_batch_size`` slice (see
``microbatch.py``), gradient clipping and an AdamW step; then the rollout engine gets the new weights. A
non-finite loss or gradient skips the update with a warning (all ranks agree) and that step writes
no checkpoint. Every random draw of a step is seeded from ``(seed, step, rank)``, so a resumed run
repeats an uninterrupted one.

Ctrl-C (SIGINT): during the rollout the step is abandoned at once; during the update the step is
finished first (its metrics line written), so the model is never saved half-updated; a second
Ctrl-C stops at once. Then, in a single process, the last completed step is checkpointed (unless it
already was, or was skipped), so ``--resume`` loses no completed step and repeats no
``metrics.jsonl`` line. Under torchrun no checkpoint is written on interrupt (the ranks may stop at
different points); ``--resume`` continues from the last scheduled one."""

from __future__ import annotations

import math
import random
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Dict, List, Optional

import torch

from .algos import make_algorithm
from .batch import TokenScorer, make_token_batch
from .checkpoint import (check_output_dir, checkpoints, clear_previous_run, gather_state, resume_checkpoint,
                         save_checkpoint, save_optimizer_shard, set_rng_state, staging_dir)
from .config import OFFLINE_PAIR_ALGOS, TrainConfig
from .distributed import all_sum, barrier, init_distributed, initialise_sharded, shard, shutdown, wrap
from .data import PromptFormatter, load_eval_examples
from .errors import UserInputError
from .evaluation import Evaluator
from .models import (ValueModel, compute_dtype, load_policy, precision_of, prepare_policy, reference_policy,
                     resolve_model_source)
from .packing import PaddingFreeWarning, padding_free_warning, resolve_padding_free
from .microbatch import accumulate_gradients, split_experience
from .reporting import Reporter
from .trackers import parse_report_to
from .schedule import apply_lr, lr_factor
from .truncated_scoring import apply_scoring_truncation


class NonFiniteLossWarning(RuntimeWarning):
    """A step's loss or gradient was NaN/inf; the update was skipped."""


class _FinishStepOnInterrupt:
    """Inside the block a first Ctrl-C is held until the block ends and then raised; a second one
    raises at once. Only on the main thread (where Python delivers signals)."""

    def __enter__(self):
        self.pending = False
        self.installed = threading.current_thread() is threading.main_thread()
        if self.installed:
            self.previous = signal.signal(signal.SIGINT, self._held)
        return self

    def _held(self, signum, frame):
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True
        print("fastpo train: interrupted: finishing this step's update (Ctrl-C again to stop at once)",
              file=sys.stderr, flush=True)

    def __exit__(self, kind, value, tb):
        if self.installed:  # None: a handler set outside Python; Python's own is the closest
            signal.signal(signal.SIGINT, signal.default_int_handler if self.previous is None else self.previous)
        if self.pending and kind is None:
            raise KeyboardInterrupt
        return False


class ExamplePool:
    """Prompts (or preference pairs) from a file: each step draws ``n`` without replacement
    (with replacement when the file holds fewer than ``n``)."""

    def __init__(self, items: List):
        if not items:
            raise UserInputError("the data file holds no examples")
        self.items = items

    def sample(self, n: int, rng: random.Random) -> List:
        return rng.sample(self.items, n) if n <= len(self.items) else rng.choices(self.items, k=n)


class Trainer:
    def __init__(self, cfg: TrainConfig, log=print):
        self.cfg = cfg.validate()
        self.dist = init_distributed(cfg.device)
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise UserInputError("--device cuda: torch sees no CUDA device")
        if cfg.rollout == "vllm" and self.dist.enabled:  # before any model is loaded
            raise UserInputError("--rollout vllm runs one colocated engine in a single process; under torchrun "
                                 "use --rollout hf")
        self.device = self.dist.device
        self.log = log if self.dist.is_main else (lambda *a, **k: None)
        self.output_dir = Path(cfg.output_dir)
        check_output_dir(self.output_dir, resume=cfg.resume, overwrite=cfg.overwrite)  # before any model loads
        if cfg.resume and not checkpoints(self.output_dir):
            raise UserInputError(f"--resume: no checkpoint in {self.output_dir} (looked for checkpoint-STEP/)")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # weight loading/saving bars would drown the step bar

        self.prompts, self.pairs, self.rewards = self._data()
        self.eval_examples = load_eval_examples(cfg)  # --eval-data / --eval-split (held out)
        self.model_source = resolve_model_source(cfg.model, log=self.log)
        # --padding-free: on/off for this device, and flash-attn's varlen attention where it runs (packing.py)
        padding_free, attn_implementation = resolve_padding_free(cfg.padding_free, self.device, compute_dtype(cfg))
        message = padding_free_warning(padding_free, attn_implementation, cfg.micro_batch_size)
        if message is not None and self.dist.is_main:
            warnings.warn(message, PaddingFreeWarning, stacklevel=2)
        self.lm, self.tokenizer = load_policy(self.model_source, cfg.dtype, self.device, attn_implementation)
        self.lm = prepare_policy(self.lm, cfg)  # LoRA adapters (and memory settings), see models.py
        self.format_prompt = PromptFormatter(self.tokenizer, cfg.chat_template)  # --chat-template
        if isinstance(self.prompts, ExamplePool):
            self.format_prompt.check(self.prompts.items + (self.eval_examples or []))
        self.algo = make_algorithm(cfg.algo, self)
        self.initial_ref = None
        self.ref = None
        if self.algo.needs_reference:
            self.ref = reference_policy(self.lm, cfg)  # a frozen copy, or LoRA's adapter-disabled base
        self.ref_step = 0
        self.critic = self.critic_eval = None
        self.precision = precision_of(cfg, self.device)  # --bf16, --cast-lm-head-fp32, --padding-free
        self.policy_eval = TokenScorer(self.lm, temperature=cfg.temperature, precision=self.precision)
        apply_scoring_truncation(self.policy_eval, cfg)  # --score-truncated (before any DDP / FSDP wrapping)
        self.trainable_modules = torch.nn.ModuleDict({"policy": self.policy_eval})
        if self.algo.needs_critic:
            self.critic_eval = ValueModel(self.lm, precision=self.precision)
            self.trainable_modules["critic"] = self.critic_eval
        if cfg.fsdp:  # shard before the optimiser sees the parameters
            probe = make_token_batch([[self.tokenizer.pad_token_id]], [[self.tokenizer.pad_token_id]],
                                     self.tokenizer.pad_token_id, self.device)
            shard(self.policy_eval, self.lm.get_decoder(), self.dist)
            probe_inputs = (probe.input_ids, probe.attention_mask, probe.rows, probe.positions)
            initialise_sharded(self.policy_eval, *probe_inputs, probe.labels)
            if self.critic_eval is not None:
                shard(self.critic_eval, self.critic_eval.backbone, self.dist)
                initialise_sharded(self.critic_eval, *probe_inputs)
            self.policy, self.critic = self.policy_eval, self.critic_eval
        else:
            self.policy = wrap(self.policy_eval, self.dist)
            self.critic = wrap(self.critic_eval, self.dist) if self.critic_eval is not None else None
        groups = [{"params": [p for p in self.lm.parameters() if p.requires_grad], "lr": cfg.lr}]
        if self.critic_eval is not None:
            groups.append({"params": list(self.critic_eval.parameters()), "lr": cfg.critic_lr or cfg.lr})
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.trainable = [p for g in groups for p in g["params"]]
        self.rollout = self._rollout_engine()
        self.evaluator = Evaluator(self)  # --eval-every (evaluation.py)

    # ---- set-up ------------------------------------------------------------------------------

    def _data(self):
        from .rewards import RewardFunction, RewardTerm, default_reward_function, exact_answer_reward
        from .countdown import CountdownTask, countdown_reward
        from .data import load_train_examples
        from .tasks import ArithmeticTask, load_preferences_jsonl, load_prompts_jsonl
        from .multi_reward import run_reward_terms

        cfg = self.cfg
        pairs = prompts = None
        if cfg.algo in OFFLINE_PAIR_ALGOS:
            pairs = ExamplePool(load_preferences_jsonl(cfg.data))
        elif cfg.task == "jsonl":
            prompts = ExamplePool(load_prompts_jsonl(cfg.data))
        elif cfg.task == "dataset":
            prompts = ExamplePool(load_train_examples(cfg))
        elif cfg.task == "countdown":
            prompts = CountdownTask()
        else:
            prompts = ArithmeticTask()
        if cfg.task == "arithmetic":
            terms = default_reward_function().terms
        elif cfg.task == "countdown":
            terms = [RewardTerm.builtin(countdown_reward, name="countdown")]
        else:
            terms = [RewardTerm.builtin(exact_answer_reward)]
        # --reward (each: math / format / regex:P / a user function) with --reward-weights
        terms = run_reward_terms(cfg.reward, cfg.reward_weights, terms)
        return prompts, pairs, RewardFunction(terms, timeout=cfg.reward_timeout)

    def _rollout_engine(self):
        if self.cfg.algo in OFFLINE_PAIR_ALGOS:
            return None
        if self.cfg.rollout == "vllm":
            return self._vllm_engine()
        from ..rollout.hf import HFGenerateRollout

        if self.cfg.fsdp:  # ranks generate in lock step (their layers all-gather together)
            return HFGenerateRollout(self.lm, self.tokenizer, full_weights=self.policy_eval,
                                     synced=self.dist.enabled)
        return HFGenerateRollout(self.lm, self.tokenizer)

    def _vllm_engine(self):
        from ..rollout.base import eos_ids_of
        from ..rollout.vllm_engine import VLLMRollout, VLLMUnavailable

        cfg = self.cfg
        kv_gib = cfg.vllm_kv_cache_gib if cfg.vllm_kv_cache_gib is not None else (
            1.0 if self.device.type == "cpu" else None)
        try:
            engine = VLLMRollout(self.model_source, self.tokenizer, eos_ids=eos_ids_of(self.lm, self.tokenizer),
                                 dtype=cfg.dtype, seed=cfg.seed, max_model_len=cfg.vllm_max_model_len,
                                 kv_cache_gib=kv_gib, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                                 sleep=cfg.vllm_sleep, device=self.device.type)
        except (VLLMUnavailable, ValueError) as exc:
            raise UserInputError(str(exc)) from None
        return engine

    def seed_for(self, step: int, purpose: int = 0) -> int:
        """The seed of one random draw of a step on this rank."""
        return (self.cfg.seed * 1_000_003 + step * 7_919 + self.dist.rank * 104_729 + purpose * 13) % (2 ** 31)

    def rng_for(self, step: int, purpose: int = 0) -> random.Random:
        return random.Random(self.seed_for(step, purpose))

    # ---- the loop ----------------------------------------------------------------------------

    def train(self) -> List[Dict]:
        cfg = self.cfg
        first_step = 0
        if self.dist.is_main:
            if cfg.overwrite:
                clear_previous_run(self.output_dir)
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise UserInputError(f"--output-dir {self.output_dir}: cannot create it ({exc.strerror or exc})") from None
        barrier(self.dist)
        if cfg.resume:
            first_step = self._resume()
        reporter = Reporter(self.output_dir, total_steps=cfg.max_steps, first_step=first_step,
                            enabled=self.dist.is_main, progress=cfg.progress, tensorboard=cfg.tensorboard,
                            report_to=parse_report_to(cfg.report_to), config=cfg.to_dict())
        if cfg.resume:
            reporter.truncate(first_step)
        records = []
        self.saved_step = done = first_step
        done_updated = in_update = False
        try:
            for step in range(first_step + 1, cfg.max_steps + 1):
                collected = self._experience(step)
                with _FinishStepOnInterrupt():
                    in_update = True
                    record, updated = self._update(step, *collected)
                    if self.evaluator.due(step):
                        record.update(self.evaluator(step))
                    reporter.log(record)
                    records.append(record)
                    if not updated:
                        reporter.message(f"step {step}: non-finite loss or gradient; update skipped")
                    self._maybe_refresh_reference(step)
                    if updated and (step == cfg.max_steps or (cfg.save_every and step % cfg.save_every == 0)):
                        self._save(step)
                    done, done_updated, in_update = step, updated, False
            reporter.plot()
        except KeyboardInterrupt:
            # the model holds the state at the end of step `done` unless a second Ctrl-C cut an update short
            if not in_update and done_updated and done > self.saved_step and not self.dist.enabled:
                reporter.message(f"fastpo train: interrupted after step {done}: saving checkpoint-{done} "
                                 "(--resume continues from it)")
                self._save(done)
            raise
        finally:
            reporter.close()
        return records

    def close(self) -> None:
        """Release the rollout engine and leave the process group."""
        if self.rollout is not None:
            self.rollout.close()
        shutdown(self.dist)

    def train_step(self, step: int):
        """One step: the experience, then the update; ``(metrics record, updated)``."""
        return self._update(step, *self._experience(step))

    def _experience(self, step: int):
        """``(experience, start time, end time, reward failures)`` of a step."""
        t0 = time.perf_counter()
        failures = sum(self.rewards.failures.values())
        exp = self.algo.experience(step)
        return exp, t0, time.perf_counter(), sum(self.rewards.failures.values()) - failures

    def _update(self, step: int, exp, t0: float, t_experience: float, reward_failures: int):
        """The optimiser passes over a step's experience and the engine's weight sync."""
        metrics: Dict[str, Optional[float]] = dict(exp.metrics)
        # --lr-scheduler / --warmup-steps: this step's rate on every parameter group (schedule.py)
        metrics["lr"] = apply_lr(self.optimizer, lr_factor(step, kind=self.cfg.lr_scheduler,
                                                           warmup=self.cfg.warmup_steps, total=self.cfg.max_steps))
        updated = True
        losses = []
        # --mini-batches optimiser steps per pass, each accumulating --micro-batch-size forward/backwards;
        # an empty experience (e.g. no pair in online DPO) backpropagates a zero loss to keep DDP in step
        mini_batches = split_experience(exp, mini_batches=self.cfg.mini_batches,
                                        micro_batch_size=self.cfg.micro_batch_size, dist=self.dist)
        for _ in range(self.cfg.epochs_per_step):
            for micro_batches in mini_batches:
                self.optimizer.zero_grad(set_to_none=True)
                loss_value, loss_metrics = accumulate_gradients(self.algo, micro_batches, self.trainable)
                grad_norm = self._clip_gradients()
                finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
                if all_sum(0.0 if finite else 1.0, self.dist) > 0:
                    warnings.warn(f"step {step}: non-finite loss ({loss_value}) or gradient norm ({grad_norm}); "
                                  "the update is skipped", NonFiniteLossWarning, stacklevel=2)
                    self.optimizer.zero_grad(set_to_none=True)
                    updated = False
                    break
                self.optimizer.step()
                losses.append(loss_value)
                metrics.update(loss_metrics)
                metrics["grad_norm"] = grad_norm
            if not updated:
                break
        t_update = time.perf_counter()
        if updated and self.rollout is not None:
            self.rollout.sync_weights(self.lm)
        t_end = time.perf_counter()
        elapsed = t_end - t0
        # where the step's time went: rollout + scoring, the optimiser passes, the engine's weight sync
        metrics.update(experience_s=t_experience - t0, update_s=t_update - t_experience, sync_s=t_end - t_update)
        metrics["loss"] = sum(losses) / len(losses) if losses else None
        metrics = {k: (None if v is None else float(v)) for k, v in metrics.items()}
        # reward terms that failed (raised, timed out, returned no finite number) this step, over all ranks
        metrics["reward_failures"] = int(all_sum(reward_failures, self.dist)) if self.dist.enabled else reward_failures
        for key in ("reward_mean", "loss", "kl", "entropy"):  # report the average over ranks
            if metrics.get(key) is not None and self.dist.enabled:
                metrics[key] = all_sum(metrics[key], self.dist) / self.dist.world_size
        record = {"step": step, **metrics, "skipped": not updated,
                  "tokens_per_s": all_sum(exp.num_tokens, self.dist) / max(elapsed, 1e-9),
                  "step_time_s": elapsed}
        return record, updated

    def _clip_gradients(self) -> float:
        """Clip to ``max_grad_norm`` (0: no clipping); the total norm before clipping. A non-finite
        norm leaves the gradients non-finite, and the step is then skipped."""
        limit = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, limit)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)

    def _maybe_refresh_reference(self, step: int) -> None:
        every = self.cfg.ref_update_every
        if self.ref is not None and every and step % every == 0:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = get_model_state_dict(self.policy_eval, options=StateDictOptions(full_state_dict=True))
            self.ref.lm.load_state_dict({k.removeprefix("lm."): v for k, v in full.items()})
            self.ref_step = step

    # ---- checkpoints -------------------------------------------------------------------------

    def _save(self, step: int) -> None:
        models = gather_state(self.trainable_modules)  # collective under FSDP
        if self.dist.is_main:
            shutil.rmtree(staging_dir(self.output_dir, step), ignore_errors=True)
            staging_dir(self.output_dir, step).mkdir(parents=True)
        barrier(self.dist)
        if self.cfg.fsdp:
            save_optimizer_shard(self.output_dir, step, self.dist.rank, self.optimizer)
        barrier(self.dist)
        if self.dist.is_main:
            try:
                save_checkpoint(self.output_dir, step, models, policy=self.lm, tokenizer=self.tokenizer,
                                optimizer_state=None if self.cfg.fsdp else self.optimizer.state_dict(),
                                reference=self.ref.lm if self.ref is not None and self.ref_step else None,
                                ref_step=self.ref_step, config=self.cfg.to_dict())
            except OSError as exc:  # disk full, permissions: the staged copy is never read
                last = f"checkpoint-{self.saved_step}" if self.saved_step else "none"
                raise UserInputError(f"cannot write checkpoint-{step} in {self.output_dir} ({exc.strerror or exc}); "
                                     f"the last complete checkpoint ({last}) is intact: free space and --resume") from None
        barrier(self.dist)
        self.saved_step = step

    def _resume(self) -> int:
        state = resume_checkpoint(self.output_dir, self.cfg, self.trainable_modules, self.optimizer,
                                  reference=self.ref.lm if self.ref is not None else None, dist=self.dist)
        set_rng_state(state["rng"])
        self.ref_step = state.get("ref_step", 0)
        if self.rollout is not None:
            self.rollout.sync_weights(self.lm)
        self.log(f"resumed from {state['path']} (step {state['step']})")
        return int(state["step"])
