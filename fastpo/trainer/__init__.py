"""The bundled trainer: thin per-algorithm modules over shared rollout, reward, batch and step pieces."""
