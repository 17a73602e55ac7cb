"""Byte-level data: the standard library corpus, the deterministic split, batches as pure functions of position.

Shape legend: B batch, T sequence, N windows, U bytes.
"""
import pytest
import torch

from ds_tutel.train.data import BLOCK_BYTES, VAL_EVERY, DataError, collect_files, decode, encode, load_corpus, split, stdlib_dir, train_batch, val_windows


def test_stdlib_corpus_is_real_python_source_and_split_deterministically():
    a = load_corpus(max_bytes=400_000)
    b = load_corpus(max_bytes=400_000)
    assert a.num_bytes == 400_000 and a.num_files > 1
    assert torch.equal(a.train_U, b.train_U) and torch.equal(a.val_U, b.val_U)
    assert a.val_U.numel() == 400_000 // (BLOCK_BYTES * VAL_EVERY) * BLOCK_BYTES
    text = decode(a.train_U[:200_000])
    assert "def " in text and "import " in text
    assert (stdlib_dir() / "os.py").is_file()


def test_split_takes_every_tenth_block_for_validation():
    blob_U = (torch.arange(VAL_EVERY * BLOCK_BYTES * 2) // BLOCK_BYTES).to(torch.uint8)
    corpus = split(blob_U)
    assert sorted(set(corpus.val_U.tolist())) == [VAL_EVERY - 1, 2 * VAL_EVERY - 1]
    assert VAL_EVERY - 1 not in set(corpus.train_U.tolist())
    with pytest.raises(DataError, match="at least"):
        split(blob_U[:BLOCK_BYTES * VAL_EVERY - 1])


def test_batches_depend_only_on_seed_step_rank_and_micro_batch():
    corpus = load_corpus(max_bytes=200_000)
    x_BT, y_BT = train_batch(corpus, seq_len=32, batch=4, seed=1, step=7, rank=1)
    again_BT, _ = train_batch(corpus, seq_len=32, batch=4, seed=1, step=7, rank=1)
    assert x_BT.shape == (4, 32) and x_BT.dtype == torch.int64
    assert torch.equal(x_BT, again_BT)
    assert torch.equal(x_BT[:, 1:], y_BT[:, :-1])  # targets are the next bytes
    for other in (dict(step=8, rank=1), dict(step=7, rank=0), dict(step=7, rank=1, micro=1)):
        assert not torch.equal(x_BT, train_batch(corpus, 32, 4, seed=1, **other)[0])
    xv_NT, yv_NT = val_windows(corpus, seq_len=32, count=6)
    assert xv_NT.shape == (6, 32) and torch.equal(xv_NT[:, 1:], yv_NT[:, :-1])


def test_user_files_and_directories(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("hello world\n" * 4000)
    (tmp_path / "docs" / "b.md").write_text("second file\n" * 1000)
    (tmp_path / "docs" / "blob.bin").write_bytes(b"\0\1\2" * 100)
    (tmp_path / "docs" / ".hidden").write_text("secret")
    files = collect_files([str(tmp_path / "docs")])
    assert [f.name for f in files] == ["a.txt", "b.md"]
    corpus = load_corpus([str(tmp_path / "docs")])
    assert corpus.num_bytes == 12 * 4000 + 12 * 1000
    assert decode(encode("héllo")) == "héllo"


def test_bad_data_paths_say_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match="data path does not exist: .*nowhere"):
        load_corpus([str(tmp_path / "nowhere")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no text files"):
        load_corpus([str(tmp_path / "empty")])
    (tmp_path / "small.txt").write_text("too short")
    with pytest.raises(DataError, match="corpus has 9 bytes"):
        load_corpus([str(tmp_path / "small.txt")])
