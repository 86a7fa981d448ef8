"""Prompt datasets through Hugging Face ``datasets`` (``--task dataset``) and the chat template.

``--data`` is one of:

- a file: ``.jsonl`` / ``.json`` (JSON lines, or one array of objects), ``.csv``, ``.parquet``: one
  split, ``train``;
- a directory written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with
  ``datasets.load_from_disk``), or any other directory ``datasets.load_dataset`` reads;
- a hub dataset id (``openai/gsm8k``, with ``--data-config main``), read with ``load_dataset``.

``--split`` picks the split (default ``train``); ``--eval-data`` / ``--eval-split`` a held-out set
(default: the ``--data`` source, split ``test``, or ``train`` of an ``--eval-data`` file).
``--prompt-field`` (default ``prompt``) is a string or a conversation (a list of
``{"role", "content"}`` messages); ``--answer-field`` (default ``answer``) a string or a number. Every
field but the prompt reaches batched reward functions as a column (TRL's convention).

Chat template (``--chat-template``): ``auto`` applies the tokenizer's template when it has one, to
conversations and to plain-string prompts (as one user message), with the generation prompt added;
``none`` uses plain strings as they are (and refuses conversations); ``FILE`` reads a Jinja template
(and sets it on the tokenizer, so checkpoints save it). TRL applies templates to conversational
prompts only; here a plain prompt for a chat model is templated too, since a GSM8K-style file of
questions is meant for the chat model it is given to."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

from .errors import UserInputError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
Prompt = Union[str, List[Dict[str, str]]]


@dataclass(frozen=True)
class DataExample:
    """One row: the prompt as in the data (a string or messages), its answer text and every field
    but the prompt (the columns batched rewards receive)."""

    prompt: Prompt
    answer: Optional[str]
    columns: Dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


def open_dataset(source: str, split: str, config: Optional[str] = None, *, flag: str = "--data"):
    """The ``datasets.Dataset`` of ``source`` (see the module docstring) for ``split``."""
    try:
        import datasets
    except ImportError:
        raise UserInputError(f"{flag}: reading datasets needs the `datasets` package: pip install datasets") from None
    path = Path(source).expanduser()
    try:
        if path.is_file():
            builder = FILE_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise UserInputError(f"{flag} {source}: unknown file type {path.suffix!r}; expected one of "
                                     f"{', '.join(FILE_BUILDERS)}")
            if split != "train":
                raise UserInputError(f"{flag} {source}: a single file has one split, 'train' (got split {split!r})")
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if path.is_dir() and any((path / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
            loaded = datasets.load_from_disk(str(path))
        elif path.is_dir() or not _looks_like_path(source):
            loaded = datasets.load_dataset(str(path) if path.is_dir() else source, config)
        else:
            raise UserInputError(f"{flag}: no such file or directory: {source}")
    except UserInputError:
        raise
    except Exception as exc:  # datasets raises many kinds (missing hub id, no network, bad file)
        raise UserInputError(f"{flag} {source}: could not load it with `datasets` ({type(exc).__name__}: "
                             f"{str(exc)[:300]})") from None
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise UserInputError(f"{flag} {source}: no split {split!r}; it has {', '.join(loaded)}")
        return loaded[split]
    return loaded


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "~", "/")) or Path(name).suffix.lower() in FILE_BUILDERS


def to_examples(dataset, prompt_field: str, answer_field: str, *, where: str) -> List[DataExample]:
    """Rows of a dataset as :class:`DataExample` s; a missing field or a value of the wrong kind is a
    ``UserInputError`` naming the row."""
    names = list(dataset.column_names)
    for name, flag in ((prompt_field, "--prompt-field"), (answer_field, "--answer-field")):
        if name not in names:
            raise UserInputError(f"{where}: no field {name!r} ({flag}); the data has {', '.join(names)}")
    if len(dataset) == 0:
        raise UserInputError(f"{where}: the split holds no rows")
    out = []
    for i, row in enumerate(dataset):
        prompt = _prompt(row[prompt_field], f"{where} row {i}, field {prompt_field!r}")
        out.append(DataExample(prompt, _answer(row[answer_field], f"{where} row {i}, field {answer_field!r}"),
                               {k: v for k, v in row.items() if k != prompt_field}))
    return out


def _prompt(value: Any, where: str) -> Prompt:
    if isinstance(value, str):
        if not value:
            raise UserInputError(f"{where}: an empty prompt")
        return value
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise UserInputError(f"{where}: expected a string or a list of {{\"role\", \"content\"}} messages, got "
                         f"{type(value).__name__} {value!r:.80}")


def _answer(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserInputError(f"{where}: the answer must be a string or a number, got {type(value).__name__} "
                             f"{value!r:.80}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UserInputError(f"{where}: the answer must be a finite number, got {value}")
    return value if isinstance(value, str) else str(value)


def load_examples(source: str, split: str, prompt_field: str, answer_field: str, config: Optional[str] = None,
                  *, flag: str = "--data") -> List[DataExample]:
    dataset = open_dataset(source, split, config, flag=flag)
    return to_examples(dataset, prompt_field, answer_field, where=f"{flag} {source} (split {split})")


def eval_source(cfg) -> Optional[tuple]:
    """``(source, split)`` of the held-out set, or None when the run has none."""
    if cfg.eval_data is None and cfg.eval_split is None:
        return None
    source = cfg.eval_data or cfg.data
    if cfg.eval_split is not None:
        return source, cfg.eval_split
    return source, "train" if Path(source).expanduser().is_file() else "test"


# ---- the chat template ---------------------------------------------------------------------------

def read_template(mode: str) -> Optional[str]:
    """The template text of ``--chat-template FILE`` (None for ``auto`` / ``none``)."""
    if mode in ("auto", "none"):
        return None
    path = Path(mode).expanduser()
    if not path.is_file():
        raise UserInputError(f"--chat-template: expected auto, none or a template file; no such file: {mode}")
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise UserInputError(f"--chat-template {mode}: the file is empty")
    return text


class PromptFormatter:
    """A prompt (string or messages) as the text the model continues, per ``--chat-template``."""

    def __init__(self, tokenizer, mode: str = "auto"):
        self.tokenizer = tokenizer
        file_template = read_template(mode)
        if file_template is not None:
            tokenizer.chat_template = file_template
        self.template = None if mode == "none" else getattr(tokenizer, "chat_template", None)
        self._cache: Dict[Any, str] = {}

    def check(self, examples) -> None:
        """Refuse conversations when no template applies (before training starts)."""
        if self.template is None and any(not isinstance(e.prompt, str) for e in examples):
            raise UserInputError("the data holds conversational prompts (lists of messages) but no chat template "
                                 "applies: the tokenizer has none (or --chat-template none); pass --chat-template FILE")

    def __call__(self, prompt: Prompt) -> str:
        if self.template is None:
            if not isinstance(prompt, str):
                raise UserInputError("a conversational prompt needs a chat template (--chat-template FILE)")
            return prompt
        key = prompt if isinstance(prompt, str) else tuple((m["role"], m["content"]) for m in prompt)
        if key not in self._cache:
            messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
            self._cache[key] = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self._cache[key]


def load_eval_examples(cfg) -> Optional[List[DataExample]]:
    """The held-out set of ``--eval-data`` / ``--eval-split`` (None without either)."""
    where = eval_source(cfg)
    if where is None:
        return None
    source, split = where
    return load_examples(source, split, cfg.prompt_field, cfg.answer_field, cfg.data_config if source == cfg.data
                         else None, flag="--eval-data" if cfg.eval_data else "--eval-split")


def load_train_examples(cfg) -> List[DataExample]:
    return load_examples(cfg.data, cfg.split, cfg.prompt_field, cfg.answer_field, cfg.data_config)
