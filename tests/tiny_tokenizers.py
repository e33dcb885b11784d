"""Hugging Face tokenizers built inside the tests (no download), saved with ``save_pretrained``: a whitespace
word-level one and a byte-level BPE one with chosen special tokens and chat template."""

from __future__ import annotations

from pathlib import Path


def word_tokenizer(path: Path, words: list[str]) -> Path:
    """A whitespace word-level tokenizer over ``words`` (ids 0-3: ``[UNK]``, ``[PAD]``, ``[BOS]``, ``[EOS]``) saved
    to ``path``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["[UNK]", "[PAD]", "[BOS]", "[EOS]", *words])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]",
                            eos_token="[EOS]").save_pretrained(path)
    return path


def bpe_tokenizer(path: Path | None, special_tokens: list[str], eos: str, corpus: str, vocab_size: int = 330,
                  chat_template: str | None = None, pad: str = "<|endoftext|>"):
    """A byte-level BPE ``PreTrainedTokenizerFast`` trained on ``corpus`` (repeated) with ``special_tokens`` first
    (ids 0, 1, ...), ``eos`` and ``pad`` among them, and ``chat_template`` if given; saved to ``path`` unless None."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator([corpus] * 20, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token=eos, pad_token=pad)
    if chat_template is not None:
        tok.chat_template = chat_template
    if path is not None:
        tok.save_pretrained(path)
    return tok
