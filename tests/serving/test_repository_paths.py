"""``real_path`` (the repository's link-following) gives what ``Path.resolve(strict=True)`` gives."""

from pathlib import Path

import pytest

from forcedphot.serving.repository import real_path


def test_real_path_follows_links_as_resolve_does_and_refuses_broken_ones(tmp_path):
    (tmp_path / "root" / "a").mkdir(parents=True)
    target = tmp_path / "root" / "a" / "file.fits"
    target.write_bytes(b"x")
    (tmp_path / "link-dir").symlink_to(tmp_path / "root", target_is_directory=True)
    (tmp_path / "root" / "alias.fits").symlink_to(Path("a") / "file.fits")
    (tmp_path / "chain.fits").symlink_to(tmp_path / "link-dir" / "alias.fits")
    for path in (target, tmp_path / "link-dir" / "a" / "file.fits", tmp_path / "chain.fits", tmp_path / "link-dir",
                 tmp_path / "root" / "a" / "." / "file.fits"):
        assert real_path(path) == path.resolve(strict=True)
    assert real_path(tmp_path / "chain.fits") == target.resolve()
    (tmp_path / "dangling.fits").symlink_to(tmp_path / "nowhere.fits")
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    for broken in (tmp_path / "dangling.fits", tmp_path / "loop-a", tmp_path / "missing.fits"):
        with pytest.raises(OSError):
            real_path(broken)
