"""The built-in tiny model: tokenizer round trip, reload through the Auto classes, deterministic build,
cache reuse, and the warm-start accuracy band (partly right, so GRPO has signal and room).

The full build runs once per test session, into a session temporary cache (``FASTPO_CACHE`` is not
touched: the tests pass the directory explicitly)."""

import json
import threading

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from fastpo.trainer import tiny_model  # noqa: E402
from fastpo.trainer.tasks import ArithmeticTask  # noqa: E402
from fastpo.trainer.tiny_model import (  # noqa: E402
    DEFAULT_SETTINGS,
    answer_accuracy,
    build_tiny_model,
    build_tokenizer,
    settings_key,
    tiny_model_path,
)


def test_tokenizer_round_trip(tmp_path):
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file() and (tmp_path / "tokenizer_config.json").is_file()
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab()
    assert len(loaded) == len(ArithmeticTask.alphabet) + 1 + 4  # the alphabet, space, 4 specials
    assert loaded.pad_token == "<pad>" and loaded.eos_token == "<eos>" and loaded.bos_token == "<bos>"
    assert loaded.pad_token_id != loaded.eos_token_id
    assert loaded.padding_side == "left"
    for text in ["17+25=42", "3-8=-5", "0+0=0", " 1 2 ", "20-20=0"]:
        ids = loaded.encode(text)  # nothing is added, special tokens or not
        assert ids == loaded.encode(text, add_special_tokens=False) == tok.encode(text)
        assert len(ids) == len(text)
        assert loaded.decode(ids) == text
        assert loaded.decode(ids + [loaded.eos_token_id, loaded.pad_token_id], skip_special_tokens=True) == text
    assert loaded.convert_ids_to_tokens(loaded.encode("7x")) == ["7", "<unk>"]
    batch = loaded(["1+1=", "12+13="], padding=True)
    assert batch["input_ids"][0][:2] == [loaded.pad_token_id] * 2 and batch["attention_mask"][0][:2] == [0, 0]


def test_build_is_deterministic_and_seeded(tmp_path):
    kwargs = dict(steps=3, log=None, eval_examples=0)
    build_tiny_model(tmp_path / "a", seed=0, **kwargs)
    build_tiny_model(tmp_path / "b", seed=0, **kwargs)
    build_tiny_model(tmp_path / "c", seed=1, **kwargs)
    before = torch.random.get_rng_state()
    states = {k: AutoModelForCausalLM.from_pretrained(tmp_path / k).state_dict() for k in "abc"}
    assert torch.equal(torch.random.get_rng_state(), before)
    assert states["a"].keys() == states["b"].keys()
    assert all(torch.equal(states["a"][k], states["b"][k]) for k in states["a"])
    assert not all(torch.equal(states["a"][k], states["c"][k]) for k in states["a"])


def test_build_leaves_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model(tmp_path, steps=1, log=None, eval_examples=0)
    assert torch.equal(torch.rand(3), expected)


def test_default_model_loads_with_auto_classes(tiny_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert cfg.head_dim == 64 and cfg.hidden_size == 128 and cfg.num_hidden_layers == 2
    assert cfg.vocab_size == len(tok)
    assert (cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id) == (
        tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert (tiny_dir / "model.safetensors").is_file()
    # generate() works on a left-padded batch and stops with <eos>.
    enc = tok(["3+4=", "12-15="], return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=4, do_sample=False)
    assert out.shape[0] == 2


def test_warm_start_accuracy_band(tiny_dir):
    """Partly right after warm-start: greedy and sampled (T=1) accuracy are well above 0 and well
    below 1, completions are almost always a bare integer ended by <eos>."""
    report = json.loads((tiny_dir / "fastpo_tiny.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    held_out = ArithmeticTask().eval_set(512, seed=99)
    greedy = answer_accuracy(model, tok, held_out, temperature=0.0)
    sampled = answer_accuracy(model, tok, held_out, temperature=1.0, seed=0)
    print(f"\ntiny model: build report {report}\n  greedy {greedy}\n  sampled T=1 {sampled}")
    assert 0.2 <= greedy["accuracy"] <= 0.8
    assert 0.12 <= sampled["accuracy"] <= 0.55
    assert sampled["accuracy"] < greedy["accuracy"]
    assert sampled["format"] >= 0.9 and sampled["eos"] >= 0.95
    assert greedy["format"] >= 0.95 and greedy["eos"] >= 0.99


def test_cache_is_reused(tiny_cache, tiny_dir, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(tiny_model, "build_tiny_model", fail)
    assert tiny_model_path(tiny_cache, log=None) == tiny_dir
    assert tiny_dir.name == f"tiny-arith-{settings_key(DEFAULT_SETTINGS, 0)}"
    # FASTPO_CACHE is the default cache directory.
    monkeypatch.setenv("FASTPO_CACHE", str(tiny_cache))
    assert tiny_model_path(log=None) == tiny_dir
    # No temporary build folders are left behind.
    assert not [p for p in tiny_cache.iterdir() if p.name.startswith(".")]


def test_settings_key_changes_with_settings_and_version(monkeypatch):
    base = settings_key(DEFAULT_SETTINGS, 0)
    assert settings_key(DEFAULT_SETTINGS, 1) != base
    other = tiny_model.TinyModelSettings(steps=DEFAULT_SETTINGS.steps + 1)
    assert settings_key(other, 0) != base
    monkeypatch.setattr(tiny_model, "TINY_MODEL_VERSION", tiny_model.TINY_MODEL_VERSION + 1)
    assert settings_key(DEFAULT_SETTINGS, 0) != base


def test_concurrent_builders_build_once(tmp_path, monkeypatch):
    """Two threads asking for a missing model: one builds, the other waits and reuses it."""
    calls = []

    def fake_build(out_dir, *, seed=0, log=None, **kwargs):
        calls.append(out_dir)
        build_tiny_model(out_dir, seed=seed, steps=1, log=None, eval_examples=0)

    monkeypatch.setattr(tiny_model, "build_tiny_model", fake_build)
    results, errors = [], []

    def worker():
        try:
            results.append(tiny_model_path(tmp_path, log=None))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1 and len(set(results)) == 1
    assert (results[0] / "config.json").is_file()
