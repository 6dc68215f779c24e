"""beit.data.cache: decode once, same pixels as decoding the file, never stale."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from beit.data import cache
from beit.data.folder import ImageFolder, load_image


def pixels(img) -> np.ndarray:
    return np.asarray(img, dtype=np.uint8)


def test_cached_images_equal_decoded_files(make_image_folder, tmp_path):
    root = make_image_folder(per_class=3, size=20)
    (root / "a" / "gray.png").parent.mkdir(exist_ok=True)
    Image.fromarray(np.arange(12 * 7, dtype=np.uint8).reshape(12, 7), "L").save(root / "a" / "gray.png")
    ds = ImageFolder(root)
    assert cache.attach(ds, tmp_path / "c", "on")
    for i, p in enumerate(ds.paths):
        np.testing.assert_array_equal(pixels(ds.cache.get(i)), pixels(load_image(p)))
    assert [f.suffix for f in sorted((tmp_path / "c").iterdir())] == [".npy", ".u8"]


def test_a_file_changed_after_caching_is_reread(make_image_folder, tmp_path):
    root = make_image_folder(per_class=2, size=16)
    ds = ImageFolder(root)
    cache.attach(ds, tmp_path / "c", "on")
    target = ds.paths[1]
    new = np.full((16, 16, 3), 7, np.uint8)
    Image.fromarray(new).save(target)
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a coarse-mtime file system still sees it
    assert ds.cache.get(1) is None  # the open cache never serves the changed file ...
    np.testing.assert_array_equal(pixels(ds.load(1)[0]), new)  # ... the dataset reads it from disk
    again = ImageFolder(root)
    cache.attach(again, tmp_path / "c", "on")  # a new run: another key, rebuilt, the old cache removed
    np.testing.assert_array_equal(pixels(again.cache.get(1)), new)
    assert len(list((tmp_path / "c").glob("decoded-*.u8"))) == 1


def test_unchanged_folder_reuses_the_cache(make_image_folder, tmp_path, monkeypatch):
    root = make_image_folder(per_class=2, size=16)
    cache.attach(ImageFolder(root), tmp_path / "c", "on")
    monkeypatch.setattr(cache, "_build", lambda *a: pytest.fail("rebuilt an up-to-date cache"))
    ds = ImageFolder(root)
    cache.attach(ds, tmp_path / "c", "on")
    assert ds.cache.get(0) is not None


def test_file_that_fails_to_decode_is_left_out(make_image_folder, tmp_path):
    """Issue 26: a file whose header reads but whose pixels do not is found when the cache decodes it and
    left out of the dataset (cache rows and samples together), never replaced by the next image."""
    root = make_image_folder(per_class=3, size=16)
    bad = root / "a" / "1.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # truncated: the header check passes, decoding fails
    ds = ImageFolder(root)
    assert bad in ds.paths and len(ds) == 6
    cache.attach(ds, tmp_path / "c", "on")
    assert bad not in ds.paths and len(ds) == 5 and len(ds.cache) == 5
    assert [(p, r) for p, r in ds.skipped] == [(bad, "could not be decoded")]
    for i, p in enumerate(ds.paths):
        np.testing.assert_array_equal(pixels(ds.cache.get(i)), pixels(load_image(p)))
    again = ImageFolder(root)  # the cache reused: the same file left out
    cache.attach(again, tmp_path / "c", "on")
    assert again.paths == ds.paths


def test_auto_skips_large_datasets(make_image_folder, tmp_path):
    ds = ImageFolder(make_image_folder(per_class=2, size=16))
    assert not cache.attach(ds, tmp_path / "c", "auto", max_bytes=100) and ds.cache is None
    assert not cache.attach(ds, tmp_path / "c", "off") and ds.cache is None
    assert cache.attach(ds, tmp_path / "c", "auto") and ds.cache is not None
