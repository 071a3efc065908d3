"""grouploss._files: a file is replaced whole or not at all."""

import threading

import pytest

from grouploss._files import replaced, replaced_together


def test_a_file_is_replaced_whole_or_kept(tmp_path):
    path = tmp_path / "sub" / "out.bin"
    with replaced(path) as tmp:
        assert tmp.parent == path.parent and tmp.name.startswith(".out.bin.tmp-")
        tmp.write_bytes(b"first")
        assert not path.exists()  # nothing under the name until the block ends
    assert path.read_bytes() == b"first"
    with pytest.raises(RuntimeError, match="disk full"):
        with replaced(path) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("disk full")
    assert path.read_bytes() == b"first"
    assert sorted(p.name for p in path.parent.iterdir()) == ["out.bin"]


def test_writers_of_one_path_never_share_a_temporary_file(tmp_path):
    """Two threads (or two processes of one pid, in two containers) saving
    to one path each write their own temporary file: the result is one
    writer's bytes, whole."""
    path = tmp_path / "x.bin"
    payloads = [bytes([i]) * ((i + 1) << 20) for i in range(4)]
    errors = []

    def write(data):
        try:
            with replaced(path) as tmp, open(tmp, "wb") as f:
                for i in range(0, len(data), 1 << 16):
                    f.write(data[i : i + (1 << 16)])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    for _ in range(5):
        threads = [threading.Thread(target=write, args=(p,)) for p in payloads]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        assert path.read_bytes() in payloads
        assert [p.name for p in tmp_path.iterdir()] == ["x.bin"]


def test_files_replaced_together_are_kept_together(tmp_path):
    emb, labels = tmp_path / "emb.npy", tmp_path / "emb_labels.npy"
    with replaced_together([emb, labels]) as (a, b):
        a.write_bytes(b"E1")
        b.write_bytes(b"L1")
    assert (emb.read_bytes(), labels.read_bytes()) == (b"E1", b"L1")
    # The second file's write fails: neither is replaced.
    with pytest.raises(OSError, match="disk full"):
        with replaced_together([emb, labels]) as (a, b):
            a.write_bytes(b"E2")
            raise OSError("disk full")
    assert (emb.read_bytes(), labels.read_bytes()) == (b"E1", b"L1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy", "emb_labels.npy"]


def test_a_writer_that_replaces_the_temporary_file_keeps_the_umasks_mode(tmp_path):
    """safetensors' save_file replaces the file it is given with one of mode
    0600: an exported model was unreadable to a serving process of another
    user. The result has the mode the umask gives a new file."""
    import os

    import torch
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    plain = tmp_path / "plain"
    plain.write_bytes(b"")
    with replaced(path) as tmp:
        save_file({"w": torch.zeros(2)}, str(tmp))
    assert os.stat(path).st_mode & 0o777 == os.stat(plain).st_mode & 0o777
