"""Caption token ids for heads that read text through their own word embeddings (a head initialised
from BLIP-2 reads captions through the Q-Former's BERT tokenizer, on which its ITM was trained).

The tokenizer's files travel inside the head's checkpoint (``CaptionTokenizer.files``), so a
trained head re-ranks on any machine without the BLIP-2 directory. ``with_caption_ids`` gives a
split its captions' ids (``text_ids`` / ``text_ids_mask``); ``text_view`` is the split as such a
head reads it (ids in place of the store's text tokens).
"""

from __future__ import annotations

import json
from dataclasses import is_dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from core.errors import CheckpointError, ConfigError
from core.split import Split

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
VOCAB_FILE = "vocab.txt"
DEFAULT_TEXT_LEN = 32  # the paper's maximum caption length


class CaptionTokenizer:
    """A Hugging Face ``tokenizers`` tokenizer (BERT WordPiece for BLIP-2) with its files."""

    def __init__(self, files: dict[str, bytes]) -> None:
        from tokenizers import Tokenizer

        self.files = dict(files)
        if TOKENIZER_FILE in files:
            self._tok = Tokenizer.from_str(files[TOKENIZER_FILE].decode("utf-8"))
        elif VOCAB_FILE in files:  # a slow-tokenizer save: vocab.txt (+ tokenizer_config.json)
            from tokenizers.implementations import BertWordPieceTokenizer

            cfg = json.loads(files.get(CONFIG_FILE, b"{}").decode("utf-8") or "{}")
            vocab = {w: i for i, w in enumerate(files[VOCAB_FILE].decode("utf-8").splitlines())}
            self._tok = BertWordPieceTokenizer(vocab, lowercase=bool(cfg.get("do_lower_case", True)))
        else:
            raise CheckpointError(f"a caption tokenizer needs {TOKENIZER_FILE} or {VOCAB_FILE}")
        self._tok.no_padding()
        self._tok.no_truncation()
        pad = self._tok.token_to_id("[PAD]")
        self.pad_id = 0 if pad is None else int(pad)
        self.vocab_size = int(self._tok.get_vocab_size())

    @classmethod
    def from_dir(cls, directory: str | Path) -> "CaptionTokenizer":
        """The tokenizer saved in ``directory`` (a BLIP-2 checkpoint directory, or any directory a
        ``transformers`` tokenizer was saved to)."""
        d = Path(directory)
        files = {n: (d / n).read_bytes() for n in (TOKENIZER_FILE, CONFIG_FILE, VOCAB_FILE) if (d / n).is_file()}
        if TOKENIZER_FILE not in files and VOCAB_FILE not in files:
            raise ConfigError(f"{d}: no tokenizer ({TOKENIZER_FILE} or {VOCAB_FILE}); pass --tokenizer DIR "
                              f"(the BLIP-2 checkpoint directory holds one)")
        return cls(files)

    def encode(self, texts: Sequence[str], length: int = DEFAULT_TEXT_LEN) -> tuple[np.ndarray, np.ndarray]:
        """(ids (C, length) int32, mask (C, length) bool): each caption with its special tokens,
        truncated to ``length`` and padded with the pad id."""
        ids = np.full((len(texts), length), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(texts), length), dtype=bool)
        self._tok.enable_truncation(max_length=length)
        try:
            for i, enc in enumerate(self._tok.encode_batch(list(texts))):
                n = len(enc.ids)
                ids[i, :n] = enc.ids
                mask[i, :n] = True
        finally:
            self._tok.no_truncation()
        return ids, mask

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps: the files (as lists of byte values for ``weights_only`` loading)."""
        return {name: list(data) for name, data in sorted(self.files.items())}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "CaptionTokenizer":
        return cls({name: bytes(data) for name, data in state.items()})


SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def build_word_tokenizer(texts: Sequence[str]) -> CaptionTokenizer:
    """A BERT-style tokenizer (lower case, punctuation split, ``[CLS] ... [SEP]``) whose vocabulary is
    every word of ``texts`` (for a Q-Former pre-trained here, where no BERT vocabulary is at hand)."""
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordPiece

    normalizer = normalizers.BertNormalizer(lowercase=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    words = sorted({w for t in texts for w, _ in splitter.pre_tokenize_str(normalizer.normalize_str(t))})
    vocab = {w: i for i, w in enumerate(list(SPECIAL_TOKENS) + words)}
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, splitter
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    config = {"tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512}
    return CaptionTokenizer({TOKENIZER_FILE: tok.to_str().encode("utf-8"),
                             CONFIG_FILE: json.dumps(config).encode("utf-8")})


def caption_tokenizer(directory: str | Path | None) -> CaptionTokenizer:
    """The caption tokenizer in ``directory`` (for a LAVIS ``.pth`` file: the directory holding it)."""
    if not directory:
        raise ConfigError("a head reading caption ids needs a tokenizer: give --tokenizer DIR or --init-from DIR")
    d = Path(directory)
    return CaptionTokenizer.from_dir(d if d.is_dir() else d.parent)


def with_caption_ids(split: Split, tokenizer: CaptionTokenizer, captions: Sequence[str],
                     length: int = DEFAULT_TEXT_LEN) -> Split:
    """``split`` with ``text_ids`` / ``text_ids_mask``: ``captions`` (aligned with its caption rows)
    through ``tokenizer``."""
    if len(captions) != len(split.caption_ids):
        raise ValueError(f"{len(captions)} caption texts for {len(split.caption_ids)} captions of split {split.split!r}")
    ids, mask = tokenizer.encode(captions, length)
    return _replace(split, text_ids=ids, text_ids_mask=mask)


def text_view(split: Split, text_input: str) -> Split:
    """The split as a head reading ``text_input`` sees it: unchanged for ``"tokens"``; for ``"ids"``
    the captions' token ids in place of the store's text tokens."""
    if text_input != "ids":
        return split
    ids = getattr(split, "text_ids", None)
    if ids is None:
        raise ConfigError(f"split {split.split!r} has no caption token ids, which a head reading caption ids "
                          f"(a BLIP-2-initialised head) needs: the captions' text comes from the store's manifest")
    return _replace(split, text_tokens=ids, text_mask=split.text_ids_mask)


def _replace(split: Split, **changes: Any) -> Split:
    if not is_dataclass(split):
        raise TypeError(f"caption ids need a dataclass split (StagedSplit), got {type(split).__name__}")
    return replace(split, **changes)
