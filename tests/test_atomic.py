import pytest

from bd3lm.atomic import atomic_directory


def test_success_replaces_the_target_and_leaves_no_temporaries(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_directory(out) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_failure_keeps_the_old_target_untouched(tmp_path):
    out = tmp_path / "export"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(out) as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("boom")
    assert (out / "old.txt").read_text() == "old" and not (out / "half.txt").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_keep_existing_drops_the_new_copy(tmp_path):
    out = tmp_path / "cache"
    out.mkdir()
    (out / "a").write_text("first")
    with atomic_directory(out, replace=False) as tmp:
        (tmp / "a").write_text("second")
    assert (out / "a").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
