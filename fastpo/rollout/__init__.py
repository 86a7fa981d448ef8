"""Rollout engines behind one small interface: Hugging Face ``generate`` and vLLM."""
