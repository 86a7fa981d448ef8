"""Shared by tests/test_integration_trl*.py: a tiny random Llama on disk, TRL trainer builders and run comparison.

Importing it skips the importing test module when TRL (or datasets) is missing or outside fastpo's tested range.
"""

import pytest
import torch

trl = pytest.importorskip("trl", reason="pip install 'fastpo[parity]'")
pytest.importorskip("datasets")

from datasets import Dataset  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from fastpo.integrations import trl as ftrl  # noqa: E402
from fastpo.trainer.tiny_model import build_tokenizer  # noqa: E402

if not ftrl.trl_supported():
    pytest.skip(f"trl {trl.__version__} is outside fastpo's tested range", allow_module_level=True)

__all__ = ["PROMPTS", "TOL", "one_thread", "tiny", "reward_len", "common_args", "rl_trainer", "losses",
           "assert_same_run", "train_pair"]

PROMPTS = ["1+2=", "3+4=", "5+6=", "7+8="]
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
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


def common_args(tmp_path, **kw):
    return dict(output_dir=str(tmp_path), bf16=False, use_cpu=True, per_device_train_batch_size=4, max_steps=3,
                learning_rate=1e-3, report_to="none", save_strategy="no", logging_steps=1, seed=0,
                dataloader_num_workers=0, **kw)


def rl_trainer(cls, config_cls, tiny, tmp_path, **kw):
    path, tok = tiny
    args = config_cls(**common_args(tmp_path, num_generations=4, max_completion_length=6, **kw))
    return cls(model=path, reward_funcs=reward_len, args=args, train_dataset=Dataset.from_dict({"prompt": PROMPTS * 4}),
               processing_class=tok)


def losses(trainer):
    return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])


def assert_same_run(stock, ours, path):
    """Same logged losses and parameters; and the run moved the parameters (else the check is empty)."""
    got, want = losses(ours), losses(stock)
    assert len(want) == 3
    torch.testing.assert_close(got, want, **TOL)
    init = LlamaForCausalLM.from_pretrained(path)
    moved = 0.0
    for (name, p), q, p0 in zip(stock.model.named_parameters(), ours.model.parameters(), init.parameters()):
        torch.testing.assert_close(q, p, **TOL, msg=lambda m: f"{name}: {m}")
        moved = max(moved, (p - p0).abs().max().item())
    assert moved > 1e-4, "the run did not train"


def train_pair(stock_cls, ours_cls, make):
    stock = make(stock_cls)
    stock.train()
    ftrl.STATS.clear()
    ours = make(ours_cls)
    ours.train()
    return stock, ours, dict(ftrl.STATS)
