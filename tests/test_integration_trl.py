"""fastpo.integrations.trl end to end against TRL 1.16: ``GRPOTrainer`` vs ``FastpoGRPOTrainer`` (and RLOO, DPO,
KTO, GRPO with LoRA) for 3 steps from the same seed on a tiny random Llama saved to a directory. The logged
losses and the parameters after the run agree to 1e-5, and the counters of ``fastpo.integrations.trl.STATS``
prove that fastpo served the passes (a run that delegated everything fails). Loss-level and head-level
parity: tests/test_integration_trl_loss.py.
"""

import pytest
import torch

from trl_helpers import (  # noqa: F401  (tiny, one_thread: fixtures)
    PROMPTS, TOL, assert_same_run, common_args, losses, one_thread, reward_len, rl_trainer, tiny, train_pair,
)
from datasets import Dataset  # noqa: E402
from trl import (  # noqa: E402
    DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer, RLOOConfig, RLOOTrainer,
)

from fastpo.integrations import trl as ftrl  # noqa: E402
from fastpo.integrations.trl_head import STATISTICS, served_outputs  # noqa: E402


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
    stock, ours, stats = train_pair(GRPOTrainer, ftrl.FastpoGRPOTrainer,
                                     lambda cls: rl_trainer(cls, GRPOConfig, tiny, tmp_path, **kw))
    assert_same_run(stock, ours, tiny[0])
    # policy + old + reference passes per generation: all through fastpo's head
    assert stats.get("served:lm_head", 0) >= 3 * 2 and "delegated:lm_head" not in stats, stats
    if case.endswith("delegated"):
        assert stats.get("delegated:grpo_loss") == 3 and "served:grpo_loss" not in stats, stats
    else:
        assert stats.get("served:grpo_loss") == 3 and "delegated:grpo_loss" not in stats, stats
        assert any("kl" in h and h["kl"] > 0 for h in ours.state.log_history), "no KL term reached the loss"


def test_rloo_train_parity(tiny, tmp_path):
    kw = dict(beta=0.04, epsilon_high=0.28, num_iterations=2)
    stock, ours, stats = train_pair(RLOOTrainer, ftrl.FastpoRLOOTrainer,
                                     lambda cls: rl_trainer(cls, RLOOConfig, tiny, tmp_path, **kw))
    assert_same_run(stock, ours, tiny[0])
    assert stats.get("served:rloo_loss") == 3 and stats.get("served:lm_head", 0) >= 6, stats


def _pref_trainer(cls, config_cls, data, tiny, tmp_path, **kw):
    path, tok = tiny
    return cls(model=path, args=config_cls(**common_args(tmp_path, max_length=16, **kw)),
               train_dataset=Dataset.from_dict(data), processing_class=tok)


def test_dpo_train_parity(tiny, tmp_path):
    data = {"prompt": PROMPTS * 3, "chosen": ["3", "7", "11", "15"] * 3, "rejected": ["4", "8", "1", "2"] * 3}
    stock, ours, stats = train_pair(DPOTrainer, ftrl.FastpoDPOTrainer,
                                     lambda cls: _pref_trainer(cls, DPOConfig, data, tiny, tmp_path))
    assert_same_run(stock, ours, tiny[0])
    # the policy asks for is_top1 and mean_logits: fastpo's head when linear_token_logprobs has outputs=
    if served_outputs() >= STATISTICS:
        assert stats.get("served:lm_head") == 6 and "delegated:lm_head" not in stats, stats
    else:
        assert stats.get("served:lm_head") == 3 and stats.get("delegated:lm_head") == 3, stats


def test_kto_train_parity(tiny, tmp_path):
    data = {"prompt": PROMPTS * 3, "completion": ["3", "8", "11", "2"] * 3, "label": [True, False, True, False] * 3}
    stock, ours, stats = train_pair(KTOTrainer, ftrl.FastpoKTOTrainer,
                                     lambda cls: _pref_trainer(cls, KTOConfig, data, tiny, tmp_path))
    assert_same_run(stock, ours, tiny[0])
    assert stats.get("served:lm_head", 0) >= 6 and "delegated:lm_head" not in stats, stats


def test_grpo_lora_train_parity(tiny, tmp_path):
    """Under PEFT TRL patches the base model and takes the reference with the adapter disabled: both passes
    go through fastpo's head."""
    peft = pytest.importorskip("peft")
    kw = dict(beta=0.04, loss_type="grpo", num_iterations=2)

    def make(cls):
        path, tok = tiny
        args = GRPOConfig(**common_args(tmp_path, num_generations=4, max_completion_length=6, **kw))
        return cls(model=path, reward_funcs=reward_len, args=args, processing_class=tok,
                   train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
                   peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))

    stock, ours, stats = train_pair(GRPOTrainer, ftrl.FastpoGRPOTrainer, make)
    torch.testing.assert_close(losses(ours), losses(stock), **TOL)
    for (name, p), q in zip(stock.model.named_parameters(), ours.model.parameters()):
        torch.testing.assert_close(q, p, **TOL, msg=lambda m: f"{name}: {m}")
    assert stats.get("served:grpo_loss") == 3 and stats.get("served:lm_head", 0) >= 6, stats
    assert "delegated:lm_head" not in stats, stats


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    """A tiny random Mixtral (4 experts, top 2) that returns router logits: TRL adds the load-balancing loss."""
    from transformers import MixtralConfig, MixtralForCausalLM

    from fastpo.trainer.tiny_model import build_tokenizer

    tok = build_tokenizer()
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, tie_word_embeddings=False, output_router_logits=True,
                        router_aux_loss_coef=0.05, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                        bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("tiny-mixtral"))
    MixtralForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path, tok


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_moe_aux_loss_train_parity(kind, tiny_moe, tmp_path):
    cls, config_cls, ours_cls = {"grpo": (GRPOTrainer, GRPOConfig, ftrl.FastpoGRPOTrainer),
                                 "rloo": (RLOOTrainer, RLOOConfig, ftrl.FastpoRLOOTrainer)}[kind]
    kw = dict(beta=0.04, num_iterations=2)
    stock, ours, stats = train_pair(cls, ours_cls, lambda c: rl_trainer(c, config_cls, tiny_moe, tmp_path, **kw))
    assert stock.aux_loss_enabled
    torch.testing.assert_close(losses(ours), losses(stock), **TOL)
    for (name, p), q in zip(stock.model.named_parameters(), ours.model.parameters()):
        torch.testing.assert_close(q, p, **TOL, msg=lambda m: f"{name}: {m}")
    aux = [(a["aux_loss"], b["aux_loss"]) for a, b in zip(stock.state.log_history, ours.state.log_history)
           if "aux_loss" in a]
    assert aux and all(a == pytest.approx(b, rel=1e-5) for a, b in aux)
    assert stats.get(f"served:{kind}_loss") == 3 and stats.get("served:lm_head", 0) >= 6, stats
    assert "delegated:lm_head" not in stats, stats
