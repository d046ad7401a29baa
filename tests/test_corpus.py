import pytest

from csr_core.corpus import SPLITS, load_corpus, split_of


def test_embedded_corpus_is_real_english_split_by_document():
    splits = {s: load_corpus("python-docs", s) for s in SPLITS}
    names = {s: {d.name for d in docs} for s, docs in splits.items()}
    assert not (names["train"] & names["test"]) and not (names["train"] & names["validation"])
    total = sum(len(d.text) for docs in splits.values() for d in docs)
    assert total > 1_000_000
    train_chars = sum(len(d.text) for d in splits["train"])
    assert 0.7 < train_chars / total < 0.9
    assert any("assignment statement" in d.text.lower() for docs in splits.values() for d in docs)
    assert load_corpus("python-docs", "test") == splits["test"]  # deterministic


def test_split_is_stable():
    # Hash-based: the same name always lands in the same split, on every machine.
    assert [split_of(f"doc{i}") for i in range(6)] == [split_of(f"doc{i}") for i in range(6)]
    counts = {s: sum(split_of(f"doc{i}") == s for i in range(2000)) for s in SPLITS}
    assert 1500 < counts["train"] < 1700 and 150 < counts["test"] < 250


def test_local_files(tmp_path):
    for i in range(40):
        (tmp_path / f"note{i}.txt").write_text(f"Document number {i}. " * 20, encoding="utf-8")
    train = load_corpus(str(tmp_path / "*.txt"), "train")
    test = load_corpus(str(tmp_path), "test")
    assert train and test and not ({d.name for d in train} & {d.name for d in test})
    # documents are named relative to the corpus root, so the split does not depend on where the folder lies
    assert len(test) == 4 and all(d.name.startswith("note") and "/" not in d.name for d in test)
    moved = tmp_path / "elsewhere" / "deeper"
    moved.mkdir(parents=True)
    for f in tmp_path.glob("note*.txt"):
        f.rename(moved / f.name)
    assert [d.name for d in load_corpus(str(moved), "test")] == [d.name for d in test]


def test_bad_local_corpora(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match=f"corpus file {empty} is empty"):
        load_corpus(str(empty), "train" if split_of(str(empty)) == "train" else split_of(str(empty)))
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("café crème".encode("latin-1"))
    with pytest.raises(ValueError, match=f"corpus file {latin} is not UTF-8"):
        load_corpus(str(latin))
    with pytest.raises(ValueError, match="nor an existing file, folder or glob"):
        load_corpus(str(tmp_path / "missing*.txt"))
    with pytest.raises(ValueError, match="split must be one of"):
        load_corpus("python-docs", "dev")


def test_a_single_text_file_splits_by_blocks_into_three_disjoint_splits(tmp_path):
    text = "\n\n".join(f"Paragraph {i}. " + "Some words about topic %d. " % i * 12 for i in range(200))
    path = tmp_path / "book.txt"
    path.write_text(text, encoding="utf-8")
    splits = {s: load_corpus(str(path), s) for s in ("train", "validation", "test")}
    assert all(splits.values())
    names = [{d.name for d in docs} for docs in splits.values()]
    assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])
    assert sum(len(d.text) for docs in splits.values() for d in docs) >= len(text) - 2 * 200  # nothing lost but separators
    assert load_corpus(str(path), "test") == splits["test"]  # deterministic
    short = tmp_path / "short.txt"
    short.write_text("One paragraph only. " * 20, encoding="utf-8")
    with pytest.raises(ValueError, match="needs at least 10"):
        load_corpus(str(short), "validation")


def test_a_single_text_file_trains_end_to_end(tiny_model_dir, tmp_path, capsys):
    from pathlib import Path

    from csr_core.dictionary_file import load_dictionary
    from tests.test_training import run_lightning_cli, tiny_fit_args

    book = tmp_path / "book.txt"
    book.write_text("\n\n".join(f"Section {i}. " + f"The value of item {i} is recorded here. " * 15 for i in range(300)),
                    encoding="utf-8")
    run_lightning_cli(tiny_fit_args(tiny_model_dir, tmp_path / "run", "--data.corpus", str(book)))
    path = Path(capsys.readouterr().out.split("Dictionary file: ")[1].split()[0])
    assert load_dictionary(path).keys.atoms[0].shape == (32, 16)
