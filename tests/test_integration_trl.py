"""fastpo.integrations.trl against TRL 1.16 itself: real trainers on a tiny random Llama saved to a directory.

* End to end: ``GRPOTrainer`` vs ``FastpoGRPOTrainer`` (and RLOO, DPO, KTO) for 3 steps from the same seed:
  the logged losses and the parameters after the run agree to 1e-5, and the counters of
  ``fastpo.integrations.trl.STATS`` prove that fastpo served the passes (a run that delegated everything fails).
* Loss level: TRL's own ``GRPOTrainer._compute_loss`` vs the mixin's, on one generated batch with perturbed
  old / reference log-probs, an empty completion row and random advantages, over the options the mixin
  serves (loss, every parameter gradient, every metric), and over cases it must hand back to TRL.
* The fused head: log-probs and entropies of TRL's head vs fastpo's, bf16 autocast, delegated requests.
* The version gate and the contract check.
"""

import math
import os

import pytest
import torch

trl = pytest.importorskip("trl", reason="pip install 'fastpo[parity]'")
pytest.importorskip("datasets")

from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer, RLOOConfig, RLOOTrainer  # noqa: E402

from fastpo.integrations import trl as ftrl  # noqa: E402
from fastpo.integrations.trl_head import head_settings, wrap_fused_lm_head  # noqa: E402
from fastpo.trainer.tiny_model import build_tokenizer  # noqa: E402

if not ftrl.trl_supported():
    pytest.skip(f"trl {trl.__version__} is outside fastpo's tested range", allow_module_level=True)

PROMPTS = ["1+2=", "3+4=", "5+6=", "7+8="]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama (float32, untied head with a bias-free lm_head) and the fastpo tokenizer, on disk
    (TRL reloads the reference model from the path when beta != 0)."""
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("tiny-llama"))
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path, tok


def reward_len(completions, **kwargs):
    return [float(len(c) % 3) for c in completions]


def _common(tmp_path, **kw):
    return dict(output_dir=str(tmp_path), bf16=False, use_cpu=True, per_device_train_batch_size=4, max_steps=3,
                learning_rate=1e-3, report_to="none", save_strategy="no", logging_steps=1, seed=0,
                dataloader_num_workers=0, **kw)


def _rl_trainer(cls, config_cls, tiny, tmp_path, **kw):
    path, tok = tiny
    args = config_cls(**_common(tmp_path, num_generations=4, max_completion_length=6, **kw))
    return cls(model=path, reward_funcs=reward_len, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
               processing_class=tok)


def _losses(trainer):
    return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])


def _assert_same_run(stock, ours, path):
    """Same logged losses and parameters; and the run moved the parameters (else the check is empty)."""
    got, want = _losses(ours), _losses(stock)
    assert len(want) == 3
    torch.testing.assert_close(got, want, **TOL)
    init = LlamaForCausalLM.from_pretrained(path)
    moved = 0.0
    for (name, p), q, p0 in zip(stock.model.named_parameters(), ours.model.parameters(), init.parameters()):
        torch.testing.assert_close(q, p, **TOL, msg=lambda m: f"{name}: {m}")
        moved = max(moved, (p - p0).abs().max().item())
    assert moved > 1e-4, "the run did not train"


def _train_pair(stock_cls, ours_cls, make):
    stock = make(stock_cls)
    stock.train()
    ftrl.STATS.clear()
    ours = make(ours_cls)
    ours.train()
    return stock, ours, dict(ftrl.STATS)


# ---------------------------------------------------------------------------------------------------- end to end
GRPO_E2E = {
    "dapo": dict(loss_type="dapo"),
    "grpo": dict(loss_type="grpo"),
    "dr_grpo": dict(loss_type="dr_grpo"),
    "bnpo": dict(loss_type="bnpo", use_bias_correction_kl=False),
    # TRL's cispo cap epsilon_high = 0.28 < 1 has no fastpo config (cispo_upper's 1 + clip_high >= 1): delegated
    "cispo-delegated": dict(loss_type="cispo"),
}


@pytest.mark.parametrize("case", list(GRPO_E2E))
def test_grpo_train_parity(case, tiny, tmp_path):
    kw = dict(beta=0.04, epsilon_high=0.28, num_iterations=2, **GRPO_E2E[case])
    stock, ours, stats = _train_pair(GRPOTrainer, ftrl.FastpoGRPOTrainer,
                                     lambda cls: _rl_trainer(cls, GRPOConfig, tiny, tmp_path, **kw))
    _assert_same_run(stock, ours, tiny[0])
    # policy + old + reference passes per generation: all through fastpo's head
    assert stats.get("served:lm_head", 0) >= 3 * 2 and "delegated:lm_head" not in stats, stats
    if case.endswith("delegated"):
        assert stats.get("delegated:grpo_loss") == 3 and "served:grpo_loss" not in stats, stats
    else:
        assert stats.get("served:grpo_loss") == 3 and "delegated:grpo_loss" not in stats, stats
        assert any("kl" in h and h["kl"] > 0 for h in ours.state.log_history), "no KL term reached the loss"


def test_rloo_train_parity(tiny, tmp_path):
    kw = dict(beta=0.04, epsilon_high=0.28, num_iterations=2)
    stock, ours, stats = _train_pair(RLOOTrainer, ftrl.FastpoRLOOTrainer,
                                     lambda cls: _rl_trainer(cls, RLOOConfig, tiny, tmp_path, **kw))
    _assert_same_run(stock, ours, tiny[0])
    assert stats.get("served:rloo_loss") == 3 and stats.get("served:lm_head", 0) >= 6, stats


def _pref_trainer(cls, config_cls, data, tiny, tmp_path, **kw):
    path, tok = tiny
    return cls(model=path, args=config_cls(**_common(tmp_path, max_length=16, **kw)),
               train_dataset=Dataset.from_dict(data), processing_class=tok)


def test_dpo_train_parity(tiny, tmp_path):
    data = {"prompt": PROMPTS * 3, "chosen": ["3", "7", "11", "15"] * 3, "rejected": ["4", "8", "1", "2"] * 3}
    stock, ours, stats = _train_pair(DPOTrainer, ftrl.FastpoDPOTrainer,
                                     lambda cls: _pref_trainer(cls, DPOConfig, data, tiny, tmp_path))
    _assert_same_run(stock, ours, tiny[0])
    # the reference passes are fastpo's; the policy wants is_top1 / mean_logits: TRL's head
    assert stats.get("served:lm_head") == 3 and stats.get("delegated:lm_head") == 3, stats


def test_kto_train_parity(tiny, tmp_path):
    data = {"prompt": PROMPTS * 3, "completion": ["3", "8", "11", "2"] * 3, "label": [True, False, True, False] * 3}
    stock, ours, stats = _train_pair(KTOTrainer, ftrl.FastpoKTOTrainer,
                                     lambda cls: _pref_trainer(cls, KTOConfig, data, tiny, tmp_path))
    _assert_same_run(stock, ours, tiny[0])
    assert stats.get("served:lm_head", 0) >= 6 and "delegated:lm_head" not in stats, stats
