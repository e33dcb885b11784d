"""Data for causal-LM training: ``TextDataModule``, the built-in ``ByteTokenizer`` and the shipped
sample corpus (``SAMPLE_DIR``; origin and licence in ``sample/SOURCE.md``)."""

from lowmem_lightning.data.reading import SAMPLE_DIR
from lowmem_lightning.data.text import TextDataModule
from lowmem_lightning.data.tokenizer import BYTE_VOCAB_SIZE, ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["TextDataModule", "ByteTokenizer", "HFTokenizer", "load_tokenizer", "BYTE_VOCAB_SIZE", "SAMPLE_DIR"]
