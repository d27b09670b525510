"""Tests for autoencoderkl.data: decoding, skipping bad files, geometry, determinism."""

from __future__ import annotations

import itertools
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autoencoderkl.data import (
    DEMO_TRAIN,
    DEMO_VAL,
    ImageFolder,
    InfiniteSampler,
    UnreadableImageWarning,
    broadcast_paths,
    demo_image_paths,
    list_images,
    load_rgb,
    to_tensor,
)


def _noise_image(path: Path, size=(40, 30), seed=0) -> Path:
    """A random RGB image of size (W, H), so different crops differ."""
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _as_tensor(path: Path) -> torch.Tensor:
    x = to_tensor(load_rgb(path))
    assert x.dtype == torch.float32 and x.shape[0] == 3
    assert x.min() >= -1.0 and x.max() <= 1.0
    return x


# --- decoding -----------------------------------------------------------------------


def test_rgba_transparent_pixel_becomes_white_and_opaque_pixel_keeps_colour(tmp_path):
    arr = np.zeros((4, 5, 4), dtype=np.uint8)
    arr[..., 0] = 255  # red everywhere
    arr[0, 0, 3] = 0  # (0, 0) fully transparent
    arr[1:, :, 3] = 255  # rows 1.. opaque
    Image.fromarray(arr, mode="RGBA").save(tmp_path / "a.png")
    x = _as_tensor(tmp_path / "a.png")
    assert x.shape == (3, 4, 5)
    assert torch.equal(x[:, 0, 0], torch.ones(3))  # transparent -> white
    assert torch.equal(x[:, 2, 2], torch.tensor([1.0, -1.0, -1.0]))  # opaque red


def test_grayscale_and_gray_alpha_load_as_three_equal_channels(tmp_path):
    Image.fromarray(np.full((3, 4), 0, dtype=np.uint8), mode="L").save(tmp_path / "l.png")
    la = np.zeros((3, 4, 2), dtype=np.uint8)  # black, alpha 0 -> white
    Image.fromarray(la, mode="LA").save(tmp_path / "la.png")
    x = _as_tensor(tmp_path / "l.png")
    assert x.shape == (3, 3, 4) and torch.all(x == -1.0)
    y = _as_tensor(tmp_path / "la.png")
    assert y.shape == (3, 3, 4) and torch.all(y == 1.0)


def test_palette_image_with_transparency_composites_over_white(tmp_path):
    img = Image.new("P", (4, 2), 0)
    img.putpalette([0, 0, 255] + [0, 255, 0] + [0] * (254 * 3))  # 0 blue, 1 green
    img.putpixel((3, 1), 1)
    img.info["transparency"] = 0  # palette entry 0 is transparent
    img.save(tmp_path / "p.png", transparency=0)
    x = _as_tensor(tmp_path / "p.png")
    assert x.shape == (3, 2, 4)
    assert torch.equal(x[:, 0, 0], torch.ones(3))  # transparent -> white
    assert torch.equal(x[:, 1, 3], torch.tensor([-1.0, 1.0, -1.0]))  # opaque green


def test_16bit_png_is_scaled_by_bit_depth_not_clipped(tmp_path):
    arr = np.array([[0, 65535, 32896]], dtype=np.uint16)  # 32896 = 128 * 257
    Image.fromarray(arr).save(tmp_path / "16.png")
    assert Image.open(tmp_path / "16.png").mode.startswith("I")
    x = _as_tensor(tmp_path / "16.png")
    assert x.shape == (3, 1, 3)
    assert torch.all(x[:, 0, 0] == -1.0)
    assert torch.all(x[:, 0, 1] == 1.0)
    assert torch.allclose(x[:, 0, 2], torch.full((3,), 128 / 127.5 - 1), atol=1e-6)  # grey, not white


@pytest.mark.parametrize("orientation, display", [
    (2, lambda a: a[:, ::-1]),  # mirrored left-right
    (3, lambda a: np.rot90(a, 2)),  # upside down
    (6, lambda a: np.rot90(a, -1)),  # turned 90 degrees clockwise to display
    (8, lambda a: np.rot90(a, 1)),  # turned 90 degrees counter-clockwise to display
    (5, lambda a: a.transpose(1, 0, 2)),  # mirrored about the main diagonal
])
def test_exif_orientation_is_applied(tmp_path, orientation, display):
    """An asymmetric image (every pixel its own colour) comes out as the EXIF tag says it is shown."""
    pixels = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3) * 14  # (H=2, W=3, RGB), all distinct
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(pixels).save(tmp_path / "tagged.png", exif=exif)  # PNG: lossless, so pixels compare exactly
    assert np.array_equal(np.asarray(load_rgb(tmp_path / "tagged.png")), display(pixels))
    # A JPEG as cameras write it: blocks of 8 x 8 px per colour survive the compression (to +-3 levels).
    blocks = pixels.repeat(8, 0).repeat(8, 1)
    Image.fromarray(blocks).save(tmp_path / "tagged.jpg", exif=exif, quality=95)
    got = np.asarray(load_rgb(tmp_path / "tagged.jpg")).astype(int)
    want = display(blocks).astype(int)
    assert got.shape == want.shape and np.abs(got - want).mean() < 3


def test_load_rgb_error_names_the_file(tmp_path):
    bad = tmp_path / "notes.jpg"
    bad.write_text("not an image")
    with pytest.raises(OSError, match="notes.jpg"):
        load_rgb(bad)


# --- listing and bad files ------------------------------------------------------------


def test_listing_is_recursive_sorted_and_ignores_other_extensions(tmp_path):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    _noise_image(tmp_path / "b.png")
    _noise_image(tmp_path / "sub" / "deeper" / "a.JPG")
    (tmp_path / "sub" / "readme.txt").write_text("x")
    (tmp_path / "sub" / "data.npy").write_bytes(b"x")
    assert list_images(tmp_path) == sorted([tmp_path / "b.png", tmp_path / "sub" / "deeper" / "a.JPG"])


def test_broadcast_paths_in_one_process_lists_here(tmp_path):
    from accelerate import Accelerator

    _noise_image(tmp_path / "b.png")
    _noise_image(tmp_path / "a.jpg")
    accelerator = Accelerator(cpu=True)
    assert broadcast_paths(accelerator, lambda: list_images(tmp_path)) == list_images(tmp_path)
    pair = broadcast_paths(accelerator, lambda: ([str(tmp_path / "a.jpg")], [tmp_path / "b.png"]))
    assert pair == ([tmp_path / "a.jpg"], [tmp_path / "b.png"])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        broadcast_paths(accelerator, lambda: list_images(tmp_path / "nowhere"))
    with pytest.raises(TypeError, match="list of paths"):
        broadcast_paths(accelerator, lambda: {"a": 1})


def test_broadcast_paths_goes_through_a_process_group(tmp_path):
    """One gloo rank: the broadcast path every rank runs, any file name, errors included."""
    import torch.distributed as dist
    from accelerate import Accelerator

    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "caf\u00e9.png", os.fsdecode(b"raw\xff.png")):  # UTF-8 and a non-UTF-8 byte
        (folder / name).write_bytes(b"")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        accelerator = Accelerator(cpu=True)
        assert broadcast_paths(accelerator, lambda: list_images(folder)) == list_images(folder)
        (tmp_path / "empty").mkdir()
        with pytest.raises(ValueError, match="no images in"):  # the main process's error, raised after the broadcast
            broadcast_paths(accelerator, lambda: list_images(tmp_path / "empty"))
        ds = ImageFolder([_noise_image(tmp_path / "ok.png"), folder / "a.png"], resolution=8)
        with pytest.warns(UnreadableImageWarning):
            ds[1]
        assert ds.num_skipped(accelerator) == ds.num_skipped() == 1
    finally:
        dist.destroy_process_group()


def test_missing_folder_raises_file_not_found_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_images(tmp_path / "nowhere")


@pytest.mark.parametrize("as_path", [False, True])
def test_a_folder_given_where_a_list_of_paths_belongs_is_a_type_error(tmp_path, as_path):
    # A str is a Sequence: it used to be read as one-letter paths ("skipping w: file not found", ...).
    folder = tmp_path if as_path else str(tmp_path)
    with pytest.raises(TypeError, match=r"list of image paths, not the folder .*list_images"):
        ImageFolder(folder, 8)


def test_folder_without_images_raises_value_error_listing_extensions(tmp_path):
    with pytest.raises(ValueError, match=r"no images in .*\.png"):
        list_images(tmp_path)  # empty
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="1 other file"):
        list_images(tmp_path)


def test_folder_of_only_unreadable_images_raises_value_error(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.warns(UnreadableImageWarning), pytest.raises(ValueError, match="none of the 1 files"):
        ImageFolder(list_images(tmp_path), resolution=8)


def _bad_files(folder: Path) -> list[Path]:
    """good.png (sorted first), text.jpg (not a JPEG) and zero.png (0 bytes)."""
    _noise_image(folder / "good.png")
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.jpg").write_text("hello, not a jpeg")
    return list_images(folder)


def test_training_set_finds_zero_byte_and_non_image_files_when_first_read(tmp_path):
    paths = _bad_files(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # construction reads good.png's header only: no warning yet
        ds = ImageFolder(paths, resolution=16)
    assert ds.paths == paths and len(ds) == 3 and ds.num_skipped() == 0
    with pytest.warns(UnreadableImageWarning) as record:
        x = ds[1]  # text.jpg, then zero.png: both unreadable, so good.png's crop comes in their place
    messages = "\n".join(str(w.message) for w in record)
    assert "text.jpg" in messages and "zero.png: empty file (0 bytes)" in messages
    assert x.shape == (3, 16, 16) and torch.equal(x, ds[0])
    assert ds.num_skipped() == 2 and {p.name for p in ds.skipped_paths()} == {"zero.png", "text.jpg"}
    assert {p.name for p, _ in ds.skipped} == {"zero.png", "text.jpg"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # flagged files are not read or warned about again
        assert torch.equal(ds[2], x)
    assert ds.num_skipped() == 2


def test_evaluation_set_drops_unreadable_files_at_construction(tmp_path):
    with pytest.warns(UnreadableImageWarning) as record:
        ds = ImageFolder(_bad_files(tmp_path), resolution=16, train=False)
    messages = "\n".join(str(w.message) for w in record)
    assert "zero.png" in messages and "text.jpg" in messages
    assert "skipped 2 of 3 files" in messages
    assert ds.paths == [tmp_path / "good.png"]
    assert {p.name for p, _ in ds.skipped} == {"zero.png", "text.jpg"}
    assert ds.num_skipped() == 2 and {p.name for p in ds.skipped_paths()} == {"zero.png", "text.jpg"}
    assert len(ds) == 1 and ds[0].shape == (3, 16, 16)


def test_training_construction_opens_only_the_first_readable_file(tmp_path, monkeypatch):
    """A million files must not mean a million opens per rank: construction reads one header."""
    good = _noise_image(tmp_path / "good.png")
    missing = [tmp_path / f"missing_{i:04d}.png" for i in range(1000)]
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda fp, *a, **k: (opened.append(Path(fp)), real_open(fp, *a, **k))[1])
    ds = ImageFolder([good, *missing], resolution=8)
    assert opened == [good] and len(ds) == 1001 and ds.num_skipped() == 0
    with pytest.warns(UnreadableImageWarning, match="missing_0999.png: file not found"):
        assert torch.equal(ds[1000], ds[0])  # the last file is missing: the first (wrapping round) replaces it
    assert ds.num_skipped() == 1


def test_only_about_20_unreadable_files_are_named_but_all_are_counted(tmp_path):
    good = _noise_image(tmp_path / "a.png")
    bad = [tmp_path / f"b{i:02d}.png" for i in range(25)]
    for path in bad:
        path.write_bytes(b"")
    ds = ImageFolder([good, *bad], resolution=8)
    with pytest.warns(UnreadableImageWarning) as record:
        ds[1]  # b00 ... b24 all fail in turn, then a.png
    named = [str(w.message) for w in record if str(w.message).startswith("skipping /")]
    assert len(named) == 20 and all("b0" in m or "b1" in m for m in named)
    assert len(record) == 21 and "without naming them" in str(record[-1].message)
    assert ds.num_skipped() == 25 and ds.skipped_paths() == bad


@pytest.mark.parametrize("train", [True, False])
def test_decompression_bombs_are_skipped(tmp_path, monkeypatch, train):
    _noise_image(tmp_path / "a_ok.png", size=(8, 8))  # sorted first: the one header a training set reads
    _noise_image(tmp_path / "warn.png", size=(12, 12))  # > MAX_IMAGE_PIXELS: a warning in PIL
    _noise_image(tmp_path / "bomb.png", size=(20, 20))  # > 2 x MAX_IMAGE_PIXELS: an error in PIL
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.warns(UnreadableImageWarning) as record:
        ds = ImageFolder(list_images(tmp_path), resolution=8, train=train)
        samples = [ds[i] for i in range(len(ds))]  # training: the bombs are found here
    assert sum("decompression bomb" in str(w.message) for w in record) == 2
    assert sorted(p.name for p in ds.skipped_paths()) == ["bomb.png", "warn.png"] and ds.num_skipped() == 2
    assert all(torch.equal(x, samples[0]) for x in samples)  # a_ok.png's crop in every place
    assert len(ds.paths) == (3 if train else 1)


def test_truncated_jpeg_is_skipped_at_getitem_and_recorded(tmp_path):
    _noise_image(tmp_path / "a.jpg", seed=1)
    _noise_image(tmp_path / "b.jpg", seed=2)
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(data[: len(data) // 2])
    for train in (True, False):  # the header passes, so both modes find it only when decoding
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the header check passes: no warning at init
            assert ImageFolder(list_images(tmp_path), resolution=16, train=train).skipped == []
    ds = ImageFolder(list_images(tmp_path), resolution=16, seed=3)
    assert len(ds.paths) == 2 and ds.skipped == []
    with pytest.warns(UnreadableImageWarning, match="a.jpg: OSError: image file is truncated"):
        x = ds[(0, 5)]
    assert [p.name for p, _ in ds.skipped] == ["a.jpg"] and ds.num_skipped() == 1
    assert torch.equal(x, ds[(1, 5)])  # replaced by the next image, same draw
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        ds[(0, 6)]
    assert len(ds.skipped) == 1


def test_every_image_failing_at_getitem_raises(tmp_path):
    _noise_image(tmp_path / "a.jpg")
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(data[: len(data) // 2])
    ds = ImageFolder([tmp_path / "a.jpg"], resolution=8)
    with pytest.warns(UnreadableImageWarning), pytest.raises(ValueError, match="could be decoded"):
        ds[0]


# --- geometry and determinism -----------------------------------------------------------


@pytest.fixture
def folder(tmp_path) -> list[Path]:
    return [_noise_image(tmp_path / f"{i}.png", size=(48, 32), seed=i) for i in range(3)]


def test_same_index_and_draw_give_identical_tensors_and_draws_differ(folder):
    ds = ImageFolder(folder, resolution=16, resize=32, seed=7)
    assert ds[(1, 4)].shape == (3, 16, 16) and ds[(1, 4)].dtype == torch.float32
    assert torch.equal(ds[(1, 4)], ImageFolder(folder, resolution=16, resize=32, seed=7)[(1, 4)])
    assert torch.equal(ds[1], ds[(1, 0)])
    draws = [ds[(1, d)] for d in range(4)]
    assert all(not torch.equal(a, b) for a, b in itertools.combinations(draws, 2))
    assert not torch.equal(ds[(1, 4)], ImageFolder(folder, resolution=16, resize=32, seed=8)[(1, 4)])


def test_eval_mode_is_deterministic_and_grid_2_gives_4_distinct_crops(folder):
    ds = ImageFolder(folder, resolution=16, resize=32, train=False, grid=2)
    assert len(ds) == 3 * 4
    crops = [ds[i] for i in range(4, 8)]  # the second image
    assert all(c.shape == (3, 16, 16) for c in crops)
    assert all(not torch.equal(a, b) for a, b in itertools.combinations(crops, 2))
    assert torch.equal(ds[5], ds[(5, 99)])  # no randomness: the draw is ignored


def test_eval_grid_corners_tile_the_resized_image(tmp_path):
    _noise_image(tmp_path / "x.png", size=(32, 32))
    full = to_tensor(load_rgb(tmp_path / "x.png"))  # resize == side: no resampling
    ds = ImageFolder([tmp_path / "x.png"], resolution=16, resize=32, train=False, grid=2)
    assert torch.equal(ds[0], full[:, :16, :16])
    assert torch.equal(ds[3], full[:, 16:, 16:])
    centre = ImageFolder([tmp_path / "x.png"], resolution=16, resize=32, train=False)
    assert len(centre) == 1 and torch.equal(centre[0], full[:, 8:24, 8:24])


def test_image_smaller_than_crop_is_upscaled_to_crop_size(tmp_path):
    """6 x 4 px -> shorter side 32 (PIL bicubic: 48 x 32), then the crop: its content, not only its range."""
    _noise_image(tmp_path / "tiny.png", size=(6, 4))
    up = Image.open(tmp_path / "tiny.png").convert("RGB").resize((48, 32), Image.BICUBIC)
    up = torch.from_numpy(np.asarray(up).copy()).permute(2, 0, 1).float() / 127.5 - 1  # (3, 32, 48)
    centre = ImageFolder([tmp_path / "tiny.png"], resolution=32, train=False)[0]
    assert torch.equal(centre, up[:, :, 8:40])
    train = ImageFolder([tmp_path / "tiny.png"], resolution=32, train=True, seed=0)
    for draw in range(4):  # a 32 x 32 window of the upscaled image, mirrored or not
        x = train[(0, draw)]
        windows = [up[:, :, left : left + 32] for left in range(17)]
        assert any(torch.equal(x, w) or torch.equal(x, w.flip(-1)) for w in windows), draw


def test_dataloader_workers_do_not_change_samples(folder):
    ds = ImageFolder(folder, resolution=16, resize=24, seed=1)
    sampler = InfiniteSampler(len(ds), seed=1)
    keys = list(itertools.islice(iter(sampler), 6))
    expected = torch.stack([ds[k] for k in keys])
    for workers in (0, 2):
        loader = torch.utils.data.DataLoader(ds, batch_size=3, sampler=sampler, num_workers=workers)
        batches = list(itertools.islice(iter(loader), 2))
        assert torch.equal(torch.cat(batches), expected), f"num_workers={workers}"


def test_files_skipped_in_dataloader_workers_are_counted_in_the_main_process(tmp_path):
    paths = [_noise_image(tmp_path / f"{i}.png", size=(16, 16), seed=i) for i in range(4)]
    for i in (1, 3):
        paths[i].write_bytes(b"")
    ds = ImageFolder(paths, resolution=8)
    # Batches of 2 over 2 workers: worker 0 reads 0.png and 1.png, worker 1 reads 2.png and 3.png.
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # each worker warns in its own process
        batches = list(loader)
    assert [len(b) for b in batches] == [2, 2]
    assert ds.skipped == []  # nothing was read in this process ...
    assert ds.num_skipped() == 2  # ... but what the workers found is counted here
    assert [p.name for p in ds.skipped_paths()] == ["1.png", "3.png"]
    assert torch.equal(batches[0][1], ds[2]) and torch.equal(batches[1][1], ds[0])  # the next readable image


# --- sampler ----------------------------------------------------------------------------


def test_two_ranks_are_disjoint_and_cover_the_truncated_epoch():
    n, world = 11, 2
    per_rank = n // world
    streams = [list(itertools.islice(iter(InfiniteSampler(n, seed=3, rank=r, world_size=world)), 2 * per_rank))
               for r in range(world)]
    for epoch in range(2):
        parts = [{i for i, e in s[epoch * per_rank:(epoch + 1) * per_rank]} for s in streams]
        assert all(e == epoch for s in streams for _, e in s[epoch * per_rank:(epoch + 1) * per_rank])
        assert parts[0].isdisjoint(parts[1])
        union = parts[0] | parts[1]
        assert len(union) == world * per_rank == 10 and union <= set(range(n))
        perm = np.random.default_rng([3, epoch]).permutation(n)
        assert union == set(perm[: world * per_rank].tolist())


def test_sampler_start_resumes_exactly_after_k_items():
    full = list(itertools.islice(iter(InfiniteSampler(7, seed=5, rank=1, world_size=2)), 40))
    for k in (0, 1, 3, 4, 10):
        resumed = list(itertools.islice(iter(InfiniteSampler(7, seed=5, rank=1, world_size=2, start=k)), 40 - k))
        assert resumed == full[k:]


def test_sampler_rejects_fewer_samples_than_ranks():
    with pytest.raises(ValueError, match="num_samples"):
        InfiniteSampler(1, world_size=2)


# --- demo -------------------------------------------------------------------------------


def test_demo_paths_exist_and_load():
    train, val = demo_image_paths("train"), demo_image_paths("val")
    assert [p.name for p in train] == list(DEMO_TRAIN) and len(train) == 7
    assert [p.name for p in val] == list(DEMO_VAL) and len(val) == 2
    for p in train + val:
        assert p.is_file()
        img = load_rgb(p)
        assert img.mode == "RGB" and min(img.size) > 0
    with pytest.raises(ValueError, match="train"):
        demo_image_paths("test")


def test_cached_images_give_the_same_samples(tmp_path):
    """cache_images only skips repeated decoding: every (index, draw) sample is unchanged."""
    paths = []
    for i, size in enumerate([(50, 40), (37, 61)]):
        rgb = np.random.default_rng(i).integers(0, 256, (*size, 3), dtype=np.uint8)
        path = tmp_path / f"img{i}.png"
        Image.fromarray(rgb).save(path)
        paths.append(path)
    plain = ImageFolder(paths, 16, 24, train=True, seed=3)
    cached = ImageFolder(paths, 16, 24, train=True, seed=3, cache_images=True)
    for key in [(0, 0), (1, 0), (0, 5), (1, 9), (0, 0)]:
        assert torch.equal(plain[key], cached[key])
    assert sorted(cached._cache) == [0, 1]


def test_rotate_and_permute_channels_transform_the_same_crop(folder):
    """The extra draws come after crop and flip: the same pixels, turned and re-ordered."""
    plain = ImageFolder(folder, resolution=16, resize=24, seed=3)
    augmented = ImageFolder(folder, resolution=16, resize=24, seed=3, rotate=True, permute_channels=True)
    seen_turns, seen_orders = set(), set()
    for draw in range(40):
        x, y = plain[(0, draw)], augmented[(0, draw)]
        matches = [
            (turns, order)
            for turns in range(4)
            for order in itertools.permutations(range(3))
            if torch.equal(torch.rot90(x, turns, dims=(1, 2))[list(order)], y)
        ]
        assert matches, f"draw {draw}: not a rotation + channel permutation of the plain crop"
        seen_turns.add(matches[0][0])
        seen_orders.add(matches[0][1])
    assert len(seen_turns) == 4 and len(seen_orders) == 6


def test_color_jitter_is_keyed_keeps_the_crop_and_changes_only_colour(folder):
    plain = ImageFolder(folder, resolution=16, resize=24, seed=3)
    jittered = ImageFolder(folder, resolution=16, resize=24, seed=3, color_jitter=0.4)
    x, y = plain[(1, 5)], jittered[(1, 5)]
    assert torch.equal(y, ImageFolder(folder, resolution=16, resize=24, seed=3, color_jitter=0.4)[(1, 5)])
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1 and not torch.equal(x, y)
    # Same crop and flip: the jittered luminance still follows the plain one, unlike
    # another crop's (a control).
    lum = lambda t: (0.299 * t[0] + 0.587 * t[1] + 0.114 * t[2]).flatten()
    corr = lambda a, b: torch.corrcoef(torch.stack([lum(a), lum(b)]))[0, 1].abs()
    assert corr(x, y) > 0.6 > 0.3 > corr(plain[(1, 6)], y)
    with pytest.raises(ValueError, match="color_jitter"):
        ImageFolder(folder, resolution=16, color_jitter=1.0)
