"""grouploss._files: a file is replaced whole or not at all."""

import pytest

from grouploss._files import replaced


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
