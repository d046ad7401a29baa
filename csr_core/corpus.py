"""Text corpora for calibration and evaluation, split by document.

Sources (`source` argument):
- ``"python-docs"`` (embedded default): English text every Python install has offline — the
  language-reference topics of `pydoc_data` plus the docstrings of the standard library's modules
  (≈ 1.8 M characters, ≈ 450 k SmolLM2 tokens). One document per topic / module.
- ``"hf:<path>[:<config>]"``, e.g. ``"hf:wikitext:wikitext-2-raw-v1"`` (the paper's calibration set):
  a Hugging Face `datasets` corpus (needs `pip install datasets` and network or a local HF cache).
  Its own train/validation/test splits are used; WikiText articles are split at `` = Title = `` lines.
- a local text file, folder or glob (``"notes/*.txt"``): one document per file, UTF-8. A single file
  is cut into blocks of whole paragraphs (≥ 1 000 characters, ≥ 50 blocks where the file allows), and
  block i goes to validation if i % 10 == 8, to test if i % 10 == 9, else to train.

Splits are deterministic and by document (a hash of the document's name; blocks by position), so
evaluation text never appears in calibration.
"""

from __future__ import annotations

import ast
import glob
import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from csr_core.paths import cache_root

EMBEDDED_CORPUS = "python-docs"
Split = Literal["train", "validation", "test"]
SPLITS = ("train", "validation", "test")
_SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
_MIN_DOC_CHARS = 500
_SKIPPED_STDLIB_DIRS = {"site-packages", "test", "idlelib", "lib2to3", "tkinter", "turtledemo"}


@dataclass(frozen=True)
class Document:
    name: str
    text: str


def load_corpus(source: str = EMBEDDED_CORPUS, split: Split = "train") -> list[Document]:
    """The documents of `split` in `source`, in a deterministic order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if source == EMBEDDED_CORPUS:
        docs = split_documents(python_docs(), split)
    elif source.startswith("hf:"):
        docs = _hf_documents(source, split)
    else:
        docs = _local_documents(source)
        if len(docs) == 1:  # one file: its blocks are the documents
            blocks = file_blocks(docs[0])
            docs = [b for i, b in enumerate(blocks) if _block_split(i) == split]
            if not docs:
                raise ValueError(f"corpus file {source!r} gives {len(blocks)} blocks of paragraphs; splitting one file "
                                 f"needs at least 10 (about 10 000 characters): add text, or pass a folder of files")
        else:
            docs = split_documents(docs, split)
    if not docs:
        raise ValueError(f"corpus {source!r} has no documents in split {split!r}: add more text")
    return docs


def split_of(name: str) -> Split:
    """Which split a document belongs to, from a hash of its name (stable across machines)."""
    u = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64
    if u < _SPLIT_FRACTIONS[0]:
        return "train"
    return "validation" if u < _SPLIT_FRACTIONS[0] + _SPLIT_FRACTIONS[1] else "test"


def split_documents(docs: list[Document], split: Split) -> list[Document]:
    return [d for d in docs if split_of(d.name) == split]


_MIN_BLOCK_CHARS = 1000
_TARGET_BLOCKS = 50


def file_blocks(doc: Document) -> list[Document]:
    """One file's text → blocks of whole paragraphs (blank-line separated), each ≥ the target size."""
    paragraphs = [p for p in doc.text.split("\n\n") if p.strip()]
    target = max(_MIN_BLOCK_CHARS, len(doc.text) // _TARGET_BLOCKS)
    blocks, current = [], []
    for p in paragraphs:
        current.append(p)
        if sum(len(q) for q in current) >= target:
            blocks.append("\n\n".join(current))
            current = []
    if current:
        blocks.append("\n\n".join(current))
    return [Document(f"{doc.name}#block{i}", text) for i, text in enumerate(blocks)]


def _block_split(i: int) -> Split:
    return "validation" if i % 10 == 8 else "test" if i % 10 == 9 else "train"


def python_docs() -> list[Document]:
    """The embedded corpus, extracted once per Python version and cached as JSON."""
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    cached = cache_root() / "corpus" / f"python-docs-{version}.json"
    if cached.is_file():
        return [Document(**d) for d in json.loads(cached.read_text())]
    docs = _pydoc_topics() + _stdlib_docstrings()
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    tmp.write_text(json.dumps([d.__dict__ for d in docs]))
    os.replace(tmp, cached)
    return docs


def _pydoc_topics() -> list[Document]:
    from pydoc_data.topics import topics

    return [Document(f"pydoc:{k}", v) for k, v in sorted(topics.items()) if len(v) >= _MIN_DOC_CHARS]


def _stdlib_docstrings() -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] in _SKIPPED_STDLIB_DIRS or "tests" in rel.parts:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue  # a few stdlib files are deliberately broken test fixtures
        nodes = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        parts = [ast.get_docstring(n) for n in ast.walk(tree) if isinstance(n, nodes)]
        text = "\n\n".join(p for p in parts if p and len(p) > 80)
        if len(text) >= _MIN_DOC_CHARS:
            docs.append(Document(f"stdlib:{rel.as_posix()}", text))
    return docs


def _local_documents(source: str) -> list[Document]:
    path = Path(source).expanduser()
    if path.is_dir():
        root, files = path, sorted(p for p in path.rglob("*") if p.is_file())
    elif path.is_file():
        root, files = path.parent, [path]
    else:
        pattern = os.path.expanduser(source)
        root = Path(pattern.split("*")[0].split("?")[0].split("[")[0]).parent if glob.has_magic(pattern) else Path(pattern)
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
    if not files:
        raise ValueError(
            f"corpus {source!r} is not {EMBEDDED_CORPUS!r}, an 'hf:<dataset>' name, nor an existing file, "
            f"folder or glob of text files"
        )
    docs = []
    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"corpus file {f} is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not text.strip():
            raise ValueError(f"corpus file {f} is empty")
        # named relative to the corpus root: a folder's split does not change when the folder moves
        docs.append(Document(f.relative_to(root).as_posix() if f.is_relative_to(root) else str(f), text))
    return docs


def _hf_documents(source: str, split: Split) -> list[Document]:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"corpus {source!r} needs Hugging Face datasets: pip install 'csr-neuraldict[datasets]'") from None
    path, _, config = source[3:].partition(":")
    try:
        rows = datasets.load_dataset(path, config or None, split=split)["text"]
    except Exception as e:  # datasets raises many types for offline / missing data
        raise ValueError(f"could not load corpus {source!r} split {split!r}: {type(e).__name__}: {e}") from None
    docs, title, lines = [], None, []
    for line in rows:
        stripped = line.strip()
        is_title = stripped.startswith("= ") and stripped.endswith(" =") and not stripped.startswith("= =")
        if is_title and lines:
            docs.append(Document(f"{source}:{split}:{len(docs)}:{title}", "".join(lines)))
            lines = []
        if is_title:
            title = stripped.strip("= ")
        lines.append(line if line.endswith("\n") else line + "\n")
    if lines:
        docs.append(Document(f"{source}:{split}:{len(docs)}:{title}", "".join(lines)))
    return [d for d in docs if d.text.strip()]
