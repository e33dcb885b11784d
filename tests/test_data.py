"""TextDataModule: byte tokenizer, JSONL templates and loss masking, packing, split, errors, sample data."""


import pytest
import torch
from record_files import write_jsonl

from lowmem_lightning.data import SAMPLE_DIR, ByteTokenizer, TextDataModule
from lowmem_lightning.data.blocks import pack_blocks, split_indices
from lowmem_lightning.data.documents import DEFAULT_PROMPT_TEMPLATE, DEFAULT_PROMPT_TEMPLATE_NO_INPUT, Document
from lowmem_lightning.data.encoding import encode_document
from lowmem_lightning.data.reading import read_documents
from lowmem_lightning.data.tokens import IGNORE_INDEX

BYTE = ByteTokenizer()


def test_byte_tokenizer_round_trips_unicode_and_marks_specials():
    text = "naïve café — λx. x² 🙂\n"
    ids = BYTE.encode(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert BYTE.decode(ids) == text
    framed = [BYTE.bos_token_id, *ids, BYTE.eos_token_id, BYTE.pad_token_id]
    assert BYTE.decode(framed) == text
    assert BYTE.decode(framed, skip_special_tokens=False) == f"<s>{text}</s><pad>"
    assert len(BYTE) == BYTE.vocab_size == 259
    with pytest.raises(ValueError, match=r"ids 0\.\.258"):
        BYTE.decode([300])


def test_instruction_record_masks_bos_and_prompt():
    doc = Document("### Instruction:\nhi\n\n### Response:\n", "hello")
    ids, labels = encode_document(doc, BYTE)
    n_prompt = 1 + len(doc.prompt.encode())
    assert ids[0] == BYTE.bos_token_id and ids[-1] == BYTE.eos_token_id
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] == [*b"hello", BYTE.eos_token_id]
    text_ids, text_labels = encode_document(Document("", "abc"), BYTE)
    assert text_labels == [IGNORE_INDEX, *b"abc", BYTE.eos_token_id] and text_ids[1:] == text_labels[1:]


def test_jsonl_templates_text_and_instruction_records(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"text": "plain record"},
        {"instruction": "Add.", "input": "1 + 2", "output": "3"},
        {"instruction": "Greet.", "output": "hello"},
        {"instruction": "Greet.", "input": "", "output": "hi"},
    ])
    docs = read_documents([path])
    assert docs[0] == Document("", "plain record")
    assert docs[1] == Document(DEFAULT_PROMPT_TEMPLATE.format(instruction="Add.", input="1 + 2"), "3")
    assert docs[2] == Document(DEFAULT_PROMPT_TEMPLATE_NO_INPUT.format(instruction="Greet."), "hello")
    assert docs[3].prompt == docs[2].prompt
    custom = read_documents([path], "Q: {instruction} [{input}]\nA: ", "Q: {instruction}\nA: ")
    assert custom[1] == Document("Q: Add. [1 + 2]\nA: ", "3") and custom[2].prompt == "Q: Greet.\nA: "


def test_prompt_completion_records_train_the_completion_only(tmp_path):
    """TRL's prompt-completion records: two strings are the prompt as written (no template; masked) and the
    completion (trained), as an instruction record's rendered prompt and output; two message lists are the
    conversation prompt + completion, trained on the completion's assistant turns. Malformed ones are named."""
    turns = [{"role": "user", "content": "2 + 2?"}]
    reply = [{"role": "assistant", "content": "4"}]
    path = write_jsonl(tmp_path / "pc.jsonl", [
        {"prompt": "Q: 2 + 2?\nA:", "completion": " 4"},
        {"prompt": turns, "completion": reply},
    ])
    docs = read_documents([path])
    assert docs[0] == Document("Q: 2 + 2?\nA:", " 4")
    chat = read_documents([write_jsonl(tmp_path / "chat.jsonl", [{"messages": turns + reply}])])[0]
    assert docs[1].messages == chat.messages == ({"role": "user", "content": "2 + 2?"},
                                                  {"role": "assistant", "content": "4"})
    ids, labels = encode_document(docs[0], BYTE)
    assert labels[:1 + len("Q: 2 + 2?\nA:")] == [IGNORE_INDEX] * (1 + len("Q: 2 + 2?\nA:"))
    assert labels[-3:] == [*b" 4", BYTE.eos_token_id]
    for record, match in [
        ({"prompt": "x", "completion": ""}, "'completion' is empty"),
        ({"prompt": "x", "completion": reply}, "must both be strings or both lists of messages, got str and list"),
        ({"prompt": turns + reply, "completion": reply}, "'prompt' holds an assistant turn"),
        ({"prompt": turns, "completion": turns}, "'completion' must be a non-empty list of assistant turns"),
    ]:
        with pytest.raises(ValueError, match=r"bad.jsonl:1: .*" + match):
            read_documents([write_jsonl(tmp_path / "bad.jsonl", [record])])


def test_packing_keeps_every_token_and_pads_only_the_end():
    encoded = [encode_document(Document("", "x" * n), BYTE) for n in (5, 17, 3)]
    total = sum(len(ids) for ids, _ in encoded)  # 25 bytes + 3 bos + 3 eos = 31
    blocks = pack_blocks(encoded, seq_len=8, pad_id=BYTE.pad_token_id)
    assert blocks["input_ids"].shape == (4, 8) and all(v.dtype == torch.long for v in blocks.values())
    mask = blocks["attention_mask"].flatten()
    assert mask.sum() == total and mask[:total].all() and not mask[total:].any()
    flat_ids = blocks["input_ids"].flatten()
    assert flat_ids[:total].tolist() == [t for ids, _ in encoded for t in ids]
    assert (flat_ids[total:] == BYTE.pad_token_id).all()
    assert (blocks["labels"].flatten()[total:] == IGNORE_INDEX).all()

    unpacked = pack_blocks(encoded, seq_len=8, pad_id=BYTE.pad_token_id, pack=False)
    assert unpacked["input_ids"].shape == (1 + 3 + 1, 8)  # 7, 19, 5 tokens -> 1, 3, 1 blocks
    assert (unpacked["input_ids"][:, 0] == BYTE.bos_token_id).tolist() == [True, True, False, False, True]
    assert unpacked["attention_mask"].sum() == total


def test_split_is_deterministic_disjoint_and_sized():
    train, val = split_indices(100, 0.1, seed=3)
    assert len(val) == 10 and len(train) == 90
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    again = split_indices(100, 0.1, seed=3)
    assert torch.equal(again[1], val) and not torch.equal(split_indices(100, 0.1, seed=4)[1], val)
    assert len(split_indices(7, 0.01, seed=0)[1]) == 1  # at least one block when val_fraction > 0
    assert len(split_indices(7, 0.0, seed=0)[1]) == 0
    with pytest.raises(ValueError, match="val_fraction=0.5"):
        split_indices(1, 0.5, seed=0)


def test_sample_data_batches(tmp_path):
    assert {"stdlib_docs.txt", "instructions.jsonl", "SOURCE.md", "LICENSE-PSF"} <= {
        p.name for p in SAMPLE_DIR.iterdir()
    }
    dm = TextDataModule("sample", seq_len=64, batch_size=4, val_fraction=0.1, seed=1)
    dm.setup("fit")
    n = len(dm.train_dataset) + len(dm.val_dataset)
    assert n > 4000 and len(dm.val_dataset) == round(0.1 * n)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "labels", "position_ids"}  # packed, documents kept apart
    assert all(v.shape == (4, 64) and v.dtype == torch.long for v in batch.values())
    assert batch["input_ids"].max() < dm.vocab_size == 259
    # The instruction records are in there, with their prompts masked.
    labels = torch.cat([dm.train_dataset.blocks["labels"], dm.val_dataset.blocks["labels"]])
    assert 0.02 < (labels == IGNORE_INDEX).float().mean() < 0.5
    again = TextDataModule("sample", seq_len=64, batch_size=4, val_fraction=0.1, seed=1)
    again.setup()
    assert torch.equal(again.val_dataset.blocks["input_ids"], dm.val_dataset.blocks["input_ids"])


def test_directory_workers_and_no_validation(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("first document " * 20)
    write_jsonl(tmp_path / "sub" / "b.jsonl", [{"text": "second"}, {"instruction": "i", "output": "o"}])
    (tmp_path / "ignored.md").write_text("# not read")  # a .csv is read now: tests/test_data_files.py
    dm = TextDataModule(str(tmp_path), seq_len=16, batch_size=2, val_fraction=0.0, num_workers=1)
    assert [p.name for p in dm.files] == ["a.txt", "b.jsonl"]
    assert dm.val_dataloader() == []
    batches = list(dm.train_dataloader())
    assert sum(len(b["input_ids"]) for b in batches) == len(dm.train_dataset) > 0


def test_local_hf_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "[BOS]": 2, "[EOS]": 3, "hello": 4, "world": 5}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]"
    ).save_pretrained(tmp_path / "tok")
    (tmp_path / "d.txt").write_text("hello world hello")
    dm = TextDataModule(str(tmp_path / "d.txt"), tokenizer=str(tmp_path / "tok"), seq_len=3, val_fraction=0.0)
    dm.setup()
    assert dm.vocab_size == 6
    assert dm.train_dataset.blocks["input_ids"].tolist() == [[2, 4, 5], [4, 3, 1]]
    assert dm.train_dataset.blocks["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"data_path": "/no/such/corpus.txt"}, "data_path='/no/such/corpus.txt'"),
        ({"tokenizer": "/no/such/tokenizer"}, "tokenizer='/no/such/tokenizer'"),
        ({"tokenizer": ""}, "tokenizer=''"),
        ({"val_fraction": 1.0}, r"val_fraction=1.0.*\[0, 1\)"),
        ({"val_fraction": -0.1}, "val_fraction=-0.1"),
        ({"seq_len": 1}, "seq_len=1"),
        ({"batch_size": 0}, "batch_size=0"),
        ({"num_workers": -1}, "num_workers=-1"),
        ({"seed": 1.5}, "seed=1.5"),
        ({"prompt_template": "{instruction} only"}, "prompt_template="),
        ({"prompt_template_no_input": "{question}"}, "prompt_template_no_input="),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TextDataModule(**kwargs)


def test_bad_files_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no .txt, .jsonl"):
        TextDataModule(str(tmp_path / "empty"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"question": "x", "answer": "y"}])
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*found keys \['answer', 'question'\]"):
        TextDataModule(str(bad)).setup()
    (tmp_path / "broken.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match="broken.jsonl:2: not valid JSON"):
        TextDataModule(str(tmp_path / "broken.jsonl")).setup()
    (tmp_path / "tiny.txt").write_text("ab")
    with pytest.raises(ValueError, match="Too little data"):
        TextDataModule(str(tmp_path / "tiny.txt"), seq_len=8, val_fraction=0.5).setup()
