"""The embedded default corpus (Python's own standard-library sources) and a tokenizer trained on it on the fly.

Every Python installation ships these files, so the demo and the tests need no download.
"""

import json
import re
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

# A fixed, ordered list keeps the corpus identical from run to run; modules missing from a trimmed Python are skipped.
CORPUS_MODULES = (
    "textwrap.py", "string.py", "heapq.py", "bisect.py", "functools.py", "fractions.py", "statistics.py",
    "shlex.py", "csv.py", "pprint.py", "calendar.py", "random.py", "difflib.py", "dataclasses.py", "enum.py",
    "argparse.py", "json/decoder.py", "json/encoder.py", "collections/__init__.py", "pathlib.py", "inspect.py",
)
SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}

# The BPE trainer's time grows with the square of a word's length: one 2 MB line without whitespace (a DNA sequence,
# minified data) trained for minutes. For training only, runs of non-space (or of space) characters longer than this
# are cut into pieces of this length; encoding still sees the whole text. Real words are far shorter, so ordinary
# text trains exactly as it would uncut.
LONGEST_TRAINING_RUN = 1000
_LONG_RUN = re.compile(rf"\S{{{LONGEST_TRAINING_RUN + 1},}}|\s{{{LONGEST_TRAINING_RUN + 1},}}")
# From this many characters of text on, training the tokenizer takes seconds: show the trainer's progress bars.
PROGRESS_FROM_CHARACTERS = 4_000_000


def embedded_corpus() -> list[str]:
    """The texts of the corpus, one string per source file, in a fixed order."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text(encoding="utf-8") for name in CORPUS_MODULES if (stdlib / name).is_file()]
    if not texts:
        raise FileNotFoundError(f"no standard-library sources found under {stdlib} for the embedded corpus")
    return texts


def load_texts(paths: list[str | Path], text_field: str = "text") -> list[str]:
    """Texts from plain-text files, JSON Lines files (`.jsonl`: one object per line, text under `text_field`) and
    folders (their `.txt` and `.jsonl` files, recursively, in sorted order). Raises before any training starts when
    a path does not exist or nothing non-empty is found."""
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl") and p.is_file())
            if not found:
                raise ValueError(f"dataset folder {path} holds no .txt or .jsonl files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"dataset path {path} does not exist")
    texts = []
    for file in files:
        if file.suffix != ".jsonl":
            texts.append(_read_utf8(file))
            continue
        for number, line in enumerate(_read_utf8(file).splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{file}:{number} is not valid JSON: {error.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{file}:{number} has no string field {text_field!r}")
            texts.append(record[text_field])
    texts = [text for text in texts if text.strip()]
    if not texts:
        raise ValueError(f"the dataset ({', '.join(map(str, paths))}) holds no text")
    return texts


def _training_pieces(text: str) -> Iterator[str]:
    """`text` in consecutive pieces, cut only inside runs longer than `LONGEST_TRAINING_RUN` (see there)."""
    start = 0
    for run in _LONG_RUN.finditer(text):
        for cut in range(run.start() + LONGEST_TRAINING_RUN, run.end(), LONGEST_TRAINING_RUN):
            yield text[start:cut]
            start = cut
    yield text[start:]


def _read_utf8(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        line = file.read_bytes()[: error.start].count(b"\n") + 1
        raise ValueError(f"{file}:{line} is not UTF-8 text (byte 0x{error.object[error.start]:02x} at offset "
                         f"{error.start}); convert the file to UTF-8") from None


def train_tokenizer(
    texts: list[str], vocab_size: int = 2048, show_progress: bool | None = None
) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any text encodes, nothing is unknown) with pad=0, bos=1, eos=2, unk=3.

    Its training time grows linearly with the text, whatever its line lengths. `show_progress`: the trainer's
    progress bars on stderr; by default for texts of `PROGRESS_FROM_CHARACTERS` or more.
    """
    if show_progress is None:
        show_progress = sum(map(len, texts)) >= PROGRESS_FROM_CHARACTERS
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    tokenizer.train_from_iterator((piece for text in texts for piece in _training_pieces(text)), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


def token_blocks(tokenizer: PreTrainedTokenizerFast, texts: list[str], block_size: int) -> torch.Tensor:
    """All texts tokenized, each followed by eos, concatenated and cut into `[num_blocks, block_size]`."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    num_blocks = len(ids) // block_size
    if num_blocks == 0:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than one block of {block_size}")
    return torch.tensor(ids[: num_blocks * block_size]).view(num_blocks, block_size)
