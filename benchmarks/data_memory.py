"""Peak memory and time of ``TextDataModule.check_inputs()`` (read, tokenize, pack, split) on a dataset of realistic
size, built here in a temporary directory.

The instruction file repeats the shipped ``data/sample/instructions.jsonl`` with a counter appended to each output
until it reaches ``--mb`` megabytes (the lead's 50 MB file: ~251k records); the chat file holds the same records as
``{"messages": [user, assistant]}`` conversations. The BPE tokenizer (``tokenizers``, vocab 8000) is trained on the
shipped corpus. Each configuration runs in a fresh process, which reports its peak RSS above the RSS it had after
importing torch and lightning (Linux: ``VmHWM`` reset through ``/proc/self/clear_refs``), the seconds and the bytes
per token the kept blocks hold.

    python benchmarks/data_memory.py --mb 50                      # every configuration
    python benchmarks/data_memory.py --mb 50 --only byte,bpe      # some of them
    PYTHONPATH=/path/to/older/checkout python benchmarks/data_memory.py --mb 50   # the same on older code
    python benchmarks/data_memory.py --mb 50 --cache              # cold (tokenize, write the cache) vs warm (load)

Without ``--cache`` every configuration runs with ``cache_dir=False`` (no token cache). With it, each runs twice on
a token cache in the temporary directory: ``cold`` tokenizes and writes the cache, ``warm`` loads it (memory-mapped);
``file GB`` is the resident part of the process that is mapped files (the cache's pages: page cache, shared by every
process mapping it), at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

SAMPLE = Path(__file__).resolve().parents[1] / "lowmem_lightning" / "data" / "sample"
CONFIGS = {  # name: (data file, tokenizer, TextDataModule keyword arguments)
    "byte": ("instructions", "byte", {}),
    "bpe": ("instructions", "bpe", {}),
    "byte_pack_false": ("instructions", "byte", {"pack": False}),
    "chat_byte": ("chat", "byte", {}),
}

CHILD = r"""  # run from the temporary directory, so PYTHONPATH (not the current directory) decides the code measured
import json, sys, time
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
import torch, lightning  # the baseline: interpreter, torch and lightning imported
from lowmem_lightning.data.text import TextDataModule
base = rss("VmRSS:")
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
except OSError:
    pass
path, tokenizer, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
import inspect
if "cache_dir" not in inspect.signature(TextDataModule).parameters:  # older code: no token cache
    kwargs.pop("cache_dir", None)
started = time.perf_counter()
dm = TextDataModule(data_path=path, tokenizer=tokenizer, seq_len=512, **kwargs)
dm.check_inputs()
seconds, peak = time.perf_counter() - started, rss("VmHWM:")
blocks = dm.train_dataset.blocks
stored = getattr(blocks, "nbytes", None)
if stored is None:  # older code: a dict of int64 tensors
    stored = sum(t.numel() * t.element_size() for ds in (dm.train_dataset, dm.val_dataset)
                 for t in ds.blocks.values())
tokens = int(sum(int(ds.blocks.lengths.sum()) if hasattr(ds.blocks, "lengths") else
                 int(ds.blocks["attention_mask"].sum()) for ds in (dm.train_dataset, dm.val_dataset)))
print(json.dumps({"seconds": seconds, "base_gb": base / 2**30, "peak_above_gb": (peak - base) / 2**30,
                  "file_gb": rss("RssFile:") / 2**30,
                  "tokens": tokens, "bytes_per_token": stored / tokens,
                  "blocks": len(dm.train_dataset) + len(dm.val_dataset)}))
"""


def instruction_records(megabytes: float) -> list[str]:
    """JSONL lines of the shipped instructions, repeated with a counter appended to each output, ``megabytes`` in
    all."""
    sample = [json.loads(line) for line in (SAMPLE / "instructions.jsonl").read_text().splitlines() if line.strip()]
    lines, size, k = [], 0, 0
    while size < megabytes * 1e6:
        record = dict(sample[k % len(sample)])
        record["output"] = f"{record['output']} ({k})"
        lines.append(json.dumps(record) + "\n")
        size, k = size + len(lines[-1]), k + 1
    return lines


def as_chat(line: str) -> str:
    """An instruction record's JSONL line as a two-turn conversation."""
    record = json.loads(line)
    question = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return json.dumps({"messages": [{"role": "user", "content": question},
                                    {"role": "assistant", "content": record["output"]}]}) + "\n"


def bpe_tokenizer(path: Path) -> Path:
    """A byte-level BPE tokenizer (vocab 8000) trained on the shipped corpus, saved to ``path``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=8000, show_progress=False, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train([str(SAMPLE / "stdlib_docs.txt"), str(SAMPLE / "instructions.jsonl")], trainer)
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>").save_pretrained(path)
    return path


def main() -> None:
    """Build the files, run each configuration in its own process, print one line of results per configuration."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=50.0, help="size of each data file, in MB (default 50)")
    parser.add_argument("--only", default=",".join(CONFIGS), help=f"configurations, of {', '.join(CONFIGS)}")
    parser.add_argument("--cache", action="store_true",
                        help="run each configuration cold (tokenize, write a token cache) and warm (load it)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lines = instruction_records(args.mb)
        files = {"instructions": tmp / "instructions.jsonl", "chat": tmp / "chat.jsonl"}
        files["instructions"].write_text("".join(lines))
        files["chat"].write_text("".join(map(as_chat, lines)))
        tokenizers = {"byte": "byte", "bpe": str(bpe_tokenizer(tmp / "bpe"))}
        print(f"{len(lines)} records; python {sys.version.split()[0]}; load average {os.getloadavg()[0]:.1f}")
        print(f"{'config':<22} {'MB':>5} {'tokens':>11} {'blocks':>7} {'s':>6} {'base GB':>8} {'peak+ GB':>9} "
              f"{'file GB':>8} {'B/token':>8}")
        for name in args.only.split(","):
            data, tokenizer, kwargs = CONFIGS[name]
            runs = ([("cold", str(tmp / f"cache_{name}")), ("warm", str(tmp / f"cache_{name}"))] if args.cache
                    else [("", False)])
            for run, cache_dir in runs:
                out = subprocess.run([sys.executable, "-c", CHILD, str(files[data]), tokenizers[tokenizer],
                                      json.dumps({**kwargs, "cache_dir": cache_dir})], capture_output=True, text=True,
                                     check=True, cwd=tmp)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                label = f"{name} {run}".strip()
                print(f"{label:<22} {files[data].stat().st_size / 1e6:>5.0f} {r['tokens']:>11,} {r['blocks']:>7,} "
                      f"{r['seconds']:>6.1f} {r['base_gb']:>8.2f} {r['peak_above_gb']:>9.2f} {r['file_gb']:>8.2f} "
                      f"{r['bytes_per_token']:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
