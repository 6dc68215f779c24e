"""beit.data.folder: discovery, robust decoding of odd files, labels, skipping bad files, clear errors."""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from beit.data import DataError, ImageFolder, list_images, load_image


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


# ---------------------------------------------------------------------------------------------- discovery


def test_list_images_recursive_sorted_case_insensitive(tmp_path):
    for rel in ["b/2.PNG", "a/x.jpeg", "a/sub/y.JpG", "a-b/z.webp", "c.bmp", "d.GIF", "e.tif", "f.TIFF"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    for rel in ["notes.txt", "a/.hidden.png", ".cache/q.png", "a/x.jpg.bak"]:
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    found = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert found == ["a/sub/y.JpG", "a/x.jpeg", "a-b/z.webp", "b/2.PNG", "c.bmp", "d.GIF", "e.tif", "f.TIFF"]
    assert list_images(tmp_path) == list_images(str(tmp_path))  # deterministic, str or Path


def test_missing_empty_and_file_roots(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "nope")
    with pytest.raises(DataError, match="does not exist"):
        list_images(tmp_path / "nope")
    with pytest.raises(DataError, match="no images found"):
        ImageFolder(tmp_path)
    (tmp_path / "readme.txt").write_text("hi")
    with pytest.raises(DataError, match="no images found"):
        ImageFolder(tmp_path)
    with pytest.raises(DataError, match="not a folder"):
        ImageFolder(tmp_path / "readme.txt")
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------------------------------------- decoding


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_load_odd_modes(tmp_path):
    gray = _save(Image.new("L", (5, 4), 100), tmp_path / "gray.png")
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 255, 0))  # fully transparent blue -> white
    rgba.putpixel((1, 0), (0, 0, 0, 128))  # half transparent black -> mid gray
    rgba = _save(rgba, tmp_path / "rgba.png")
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal = _save(pal, tmp_path / "palette.png")
    cmyk = _save(Image.new("CMYK", (6, 6), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=100)
    a16 = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369)  # 0 .. 65535
    i16 = _save(Image.fromarray(a16), tmp_path / "deep.png")
    la = _save(Image.new("LA", (3, 3), (0, 0)), tmp_path / "la.png")

    g = load_image(gray)
    assert g.mode == "RGB" and g.size == (5, 4) and g.getpixel((0, 0)) == (100, 100, 100)
    r = load_image(rgba)
    assert r.mode == "RGB"
    assert r.getpixel((0, 0)) == (255, 255, 255)
    assert r.getpixel((2, 2)) == (255, 0, 0)
    assert all(abs(v - 127) <= 1 for v in r.getpixel((1, 0)))
    assert load_image(pal).getpixel((0, 0)) == (10, 200, 30)
    c = load_image(cmyk).getpixel((3, 3))
    assert c[0] > 240 and c[1] < 15 and c[2] < 15  # CMYK (0, 1, 1, 0) is red
    assert load_image(la).getpixel((1, 1)) == (255, 255, 255)
    d = np.asarray(load_image(i16))
    assert d.dtype == np.uint8 and d.shape == (4, 4, 3)
    assert d[0, 0, 0] == 0 and d[-1, -1, 0] == 255
    np.testing.assert_array_equal(d[..., 0], np.rint(a16 / 257).astype(np.uint8))


def test_exif_rotation_applied(tmp_path):
    # A 6x4 landscape image whose EXIF says "rotate 90 CW to display" (orientation 6) must come out 4x6.
    img = Image.new("RGB", (6, 4), (0, 0, 0))
    img.putpixel((0, 0), (255, 255, 255))  # stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(img, tmp_path / "rot.jpg", exif=exif.tobytes(), quality=100)
    out = load_image(path)
    assert out.size == (4, 6)
    # after a 90 degree clockwise rotation the stored top-left pixel sits at the top-right
    assert sum(out.getpixel((3, 0))) > 600 and sum(out.getpixel((0, 0))) < 150


def test_bad_files_give_none_and_one_warning(tmp_path, caplog):
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="PNG")
    (tmp_path / "trunc.png").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("this is not a jpeg\n")
    for name in ["trunc.png", "empty.png", "text.jpg"]:
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert load_image(tmp_path / name) is None
        msgs = _warnings(caplog)
        assert len(msgs) == 1 and name in msgs[0] and "\n" not in msgs[0]


# ---------------------------------------------------------------------------------------------- dataset


def test_image_folder_labels(make_image_folder):
    root = make_image_folder(classes=("cat", "dog", "zebra"), per_class=2, size=8)
    (root / "empty_class").mkdir()
    ds = ImageFolder(root, with_labels=True)
    assert ds.classes == ["cat", "dog", "empty_class", "zebra"]
    assert ds.class_to_idx["zebra"] == 3
    assert len(ds) == 6 and ds.targets == [0, 0, 1, 1, 3, 3]
    img, label = ds[4]
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (8, 8) and label == 3
    flat = ImageFolder(root, transform=lambda im: im.size)
    assert len(flat) == 6 and flat[0] == (8, 8) and flat.classes == []
    assert flat[-1] == (8, 8)
    with pytest.raises(IndexError):
        flat[6]


def test_image_folder_labels_need_class_folders(make_image_folder, caplog):
    root = make_image_folder(classes=(), per_class=3, size=8)
    with pytest.raises(DataError, match="class sub-folders"):
        ImageFolder(root, with_labels=True)
    (root / "k").mkdir()
    Image.new("RGB", (8, 8)).save(root / "k" / "x.png")
    with caplog.at_level(logging.WARNING):
        ds = ImageFolder(root, with_labels=True)
    assert len(ds) == 1 and any("not in a class folder" in m for m in _warnings(caplog))


def test_image_folder_leaves_bad_files_out(make_image_folder, caplog):
    """Issue 26: an unreadable file is left out of the index (one warning counting them), never replaced by
    another image with that image's label (which counted it twice)."""
    root = make_image_folder(classes=("a", "b"), per_class=2, size=8)
    (root / "a" / "0.png").write_bytes(b"")  # index 0 broken
    (root / "b" / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # index 3 broken (the last)
    with caplog.at_level(logging.WARNING):
        ds = ImageFolder(root, transform=np.asarray, with_labels=True)
    assert [p.relative_to(root).as_posix() for p in ds.paths] == ["a/1.png", "b/0.png"]
    assert ds.targets == [0, 1]
    assert [(p.name, r) for p, r in ds.skipped] == [("0.png", "an empty file"), ("1.png", ds.skipped[1][1])]
    msgs = _warnings(caplog)
    assert len(msgs) == 1 and "2 of 4 files are left out" in msgs[0], msgs
    assert "a/0.png" in msgs[0] and "b/1.png" in msgs[0]


def test_image_folder_all_bad(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpg").write_text("no")
    with pytest.raises(DataError, match="none of the 2 image files .* could be read"):
        ImageFolder(tmp_path)


def test_image_folder_with_dataloader(image_folder):
    import torch
    from torchvision.transforms import functional as TF

    ds = ImageFolder(image_folder, transform=TF.to_tensor, with_labels=True)
    x, y = next(iter(torch.utils.data.DataLoader(ds, batch_size=8)))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.tolist() == [0] * 4 + [1] * 4


def test_huge_images_are_downscaled_at_decode_or_skipped(tmp_path, caplog):
    Image.new("RGB", (64, 48), (200, 10, 30)).save(tmp_path / "big.jpg", quality=95)
    Image.new("RGB", (64, 48), (10, 200, 30)).save(tmp_path / "big.png")
    Image.new("RGB", (20, 20), (10, 10, 200)).save(tmp_path / "small.png")
    with caplog.at_level(logging.WARNING):
        jpg = load_image(tmp_path / "big.jpg", max_pixels=1000)  # 3072 px: draft 1/2 -> 32x24 = 768 px
        png = load_image(tmp_path / "big.png", max_pixels=1000)
        small = load_image(tmp_path / "small.png", max_pixels=1000)
    assert jpg.size == (32, 24) and jpg.mode == "RGB"
    assert abs(np.asarray(jpg).astype(int) - (200, 10, 30)).max() < 8
    assert png is None and small.size == (20, 20)
    assert "skipping huge image" in caplog.text and "big.png: 64x48" in caplog.text
    folder = ImageFolder(tmp_path, max_pixels=1000)
    # big.png is left out of the index (issue 26: never replaced by the next readable image)
    assert [folder[i].size for i in range(len(folder))] == [(32, 24), (20, 20)]


def test_worker_error_comes_back_as_the_original_line(tmp_path):
    from torch.utils.data import DataLoader

    from beit.data.folder import DropUnreadable, unwrap_worker_error

    Image.new("RGB", (64, 64), (1, 2, 3)).save(tmp_path / "a.png")
    ds = ImageFolder(tmp_path, transform=lambda im: 0)  # the header reads: kept
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "a.png").write_bytes(data[: len(data) // 2])  # truncated afterwards: fails when drawn
    loader = DataLoader(ds, batch_size=1, num_workers=1, collate_fn=DropUnreadable())
    with pytest.raises(DataError) as e:
        next(iter(loader))
    assert "Traceback" in str(e.value)  # PyTorch's wrapper
    plain = unwrap_worker_error(e.value)
    assert type(plain) is DataError
    assert str(plain) == "none of the 1 images of a batch could be decoded (see the warnings above)"
    other = ValueError("x")
    assert unwrap_worker_error(other) is other
