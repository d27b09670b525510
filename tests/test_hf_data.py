"""Data at scale: Hugging Face datasets sources (WebDataset shards, parquet, imagefolder).

Tiny shards are made in each test from a folder of small PNGs; nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

pytest.importorskip("datasets")
pytest.importorskip("webdataset")
pytest.importorskip("torchdata")

from autoencoderkl.config import load_config  # noqa: E402
from autoencoderkl.hf_data import (  # noqa: E402
    StreamBatches,
    find_image_column,
    image_bytes,
    load_hf,
    prepare_columns,
    rank_stream,
)
from autoencoderkl.shards import make_shards  # noqa: E402
from conftest import tiny_overrides, torchrun, write_photos  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def flat_photos(folder: Path, n: int, size: int = 16) -> list[Path]:
    """n square PNGs, image i filled with the colour (i, 2i, 3i): a sample names itself by its mean."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img_{i:03d}.png"
        Image.new("RGB", (size, size), (i, 2 * i, 3 * i)).save(path)
        paths.append(path)
    return paths


def ident(x: torch.Tensor) -> int:
    """Which flat photo a (3, r, r) crop in [-1, 1] came from (flips and crops keep a flat colour)."""
    return round(float((x[0].mean() + 1) * 127.5))


def data_cfg(**kw):
    d = dict(resolution=16, resize=None, rotate=False, permute_channels=False, color_jitter=0.0, shuffle_buffer=0,
             num_workers=0)
    d.update(kw)
    return SimpleNamespace(**d)


def open_stream(shards: Path, rank=0, world=1, seed=0, **kw) -> tuple:
    ds = load_hf("webdataset", [str(shards / "train-*.tar")], "train", streaming=True)
    column = find_image_column(ds.features, None, "test")
    stream, workers, _ = rank_stream(prepare_columns(ds, column), column, data_cfg(**kw), seed, rank, world)
    return stream, workers


def take(batches, n: int) -> list[int]:
    return [ident(x) for _ in range(n) for x in next(batches)]


def test_make_shards_writes_labelled_shards_an_index_and_a_held_out_split(tmp_path):
    for k, name in enumerate(("cat", "dog")):
        write_photos(tmp_path / "photos" / name, n=5, seed=k)
    index = make_shards(tmp_path / "photos", tmp_path / "shards", shard_size=3, val_fraction=0.2)
    assert index["classes"] == ["cat", "dog"] and index["image_field"] == "png"
    train, val = index["splits"]["train"], index["splits"]["validation"]
    assert (train["num_samples"], val["num_samples"]) == (8, 2)
    assert [s["num_samples"] for s in train["shards"]] == [3, 3, 2]
    assert json.loads((tmp_path / "shards" / "index.json").read_text()) == index
    with tarfile.open(tmp_path / "shards" / "train-000000.tar") as tar:
        names = tar.getnames()
        first = tar.extractfile("00000001.png").read()
        label = tar.extractfile("00000001.cls").read()
    # Image 0 (and 9) went to validation: evenly spaced in sorted order.
    assert sorted(names[:3]) == ["00000001.cls", "00000001.path.txt", "00000001.png"] and label == b"0"
    assert first == (tmp_path / "photos" / "cat" / "photo_01.png").read_bytes()  # the file's bytes, untouched
    with pytest.raises(ValueError, match="not empty"):
        make_shards(tmp_path / "photos", tmp_path / "shards")
    Image.new("RGB", (8, 8)).save(tmp_path / "photos" / "cat" / "x.jpg")
    with pytest.raises(ValueError, match=r"mixes image formats \(1 jpg, 10 png\).*--image-format png"):
        make_shards(tmp_path / "photos", tmp_path / "other")


def test_the_three_builders_load_the_same_images(tmp_path):
    """webdataset (tars), parquet and imagefolder give the same image bytes and labels."""
    for k, name in enumerate(("cat", "dog")):
        write_photos(tmp_path / "photos" / name, n=3, seed=k)
    make_shards(tmp_path / "photos", tmp_path / "shards", shard_size=2)
    import datasets

    files = sorted((tmp_path / "photos").rglob("*.png"))
    table = datasets.Dataset.from_dict({"image": [{"bytes": p.read_bytes(), "path": p.name} for p in files],
                                        "label": [int(p.parent.name == "dog") for p in files]})
    table.cast_column("image", datasets.Image()).to_parquet(str(tmp_path / "table.parquet"))

    def read(dataset, data_files, label):
        ds = load_hf(dataset, data_files, "train", streaming=True)
        column = find_image_column(ds.features, None, dataset)
        return sorted((image_bytes(ex[column]), ex[label]) for ex in prepare_columns(ds, column, [label]))

    want = sorted((p.read_bytes(), int(p.parent.name == "dog")) for p in files)
    assert read("webdataset", [str(tmp_path / "shards" / "train-{000000..000002}.tar")], "cls") == want
    assert read(None, [str(tmp_path / "table.parquet")], "label") == want  # builder from the extension
    assert read(str(tmp_path / "photos"), None, "label") == want  # a local folder: datasets' imagefolder


def test_a_map_style_table_gives_the_crops_of_the_folder_and_skips_a_bad_row(tmp_path, monkeypatch):
    """data.streaming=false: rows of the Arrow table are sampled exactly as the folder's files."""
    import datasets

    from autoencoderkl.data import ImageFolder
    from autoencoderkl.hf_data import HFImages

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    paths = write_photos(tmp_path / "photos", n=5)
    cells = [{"bytes": p.read_bytes(), "path": p.name} for p in paths]
    cells[3] = {"bytes": b"not an image", "path": "bad.png"}
    datasets.Dataset.from_dict({"image": cells}).cast_column("image", datasets.Image()).to_parquet(
        str(tmp_path / "t.parquet"))
    ds = load_hf("parquet", [str(tmp_path / "t.parquet")], "train", streaming=False)
    assert isinstance(ds, datasets.Dataset) and len(ds) == 5
    kw = dict(resize=24, seed=3, color_jitter=0.2, rotate=True)
    table = HFImages(prepare_columns(ds, "image"), "image", "t", 16, **kw)
    folder = ImageFolder(paths, 16, **kw)
    for key in [(0, 0), (4, 0), (2, 7)]:
        assert torch.equal(table[key], folder[key]), f"sample {key} differs from the folder's"
    with pytest.warns(UserWarning, match=r"skipping t\[3\]"):
        assert torch.equal(table[(3, 1)], folder[(4, 1)])  # a bad row: the next readable one, as a bad file
    assert table.num_skipped() == 1


def test_two_ranks_read_disjoint_samples_that_cover_the_shards(tmp_path):
    flat_photos(tmp_path / "photos", 24)
    make_shards(tmp_path / "photos", tmp_path / "shards", shard_size=3)  # 8 shards: 4 per rank
    seen = []
    for rank in (0, 1):
        stream, workers = open_stream(tmp_path / "shards", rank, 2, num_workers=2)
        seen.append([ident(x) for batch in StreamBatches(stream, 1, workers).loader for x in batch])  # one epoch
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(24))
    # A shard count that does not divide by the ranks: every rank keeps every 2nd example.
    seen = [[ident(x) for x in open_stream(tmp_path / "shards", rank, 3)[0]] for rank in (0, 1, 2)]
    assert sorted(sum(seen, [])) == list(range(24)) and all(seen)


@pytest.mark.parametrize("buffer", [0, 4])
def test_a_resumed_stream_continues_exactly_without_a_buffer_and_within_the_bound_with_one(tmp_path, buffer):
    """Take k batches, save the state as JSON (a checkpoint), rebuild, load, go on; compare.

    Without a buffer the samples and their order equal an uninterrupted stream's, across
    an epoch boundary too. With a buffer of B, the resumed epoch loses at most B - 1
    samples per DataLoader worker and repeats none (docs/data-at-scale.md).
    """
    flat_photos(tmp_path / "photos", 30)
    make_shards(tmp_path / "photos", tmp_path / "shards", shard_size=5)  # 6 shards: 3 per worker
    workers = 2

    def batches(state=None):
        stream, w = open_stream(tmp_path / "shards", shuffle_buffer=buffer, num_workers=workers)
        b = StreamBatches(stream, 1, w)
        if state is not None:
            b.load_state_dict(json.loads(json.dumps(state)))
        return b

    straight = take(batches(), 60)  # two epochs of the 30 images
    assert sorted(straight[:30]) == sorted(straight[30:]) == list(range(30)) and straight[:30] != straight[30:]
    worst = 0
    for k in ((1, 16, 30, 45) if buffer == 0 else (1, 7, 16, 23)):
        first = batches()
        head = take(first, k)
        resumed = batches(first.state_dict())
        if buffer == 0:
            assert head + take(resumed, 60 - k) == straight, f"resuming after {k} batches changed the stream"
            continue
        rest = []
        while resumed.epoch == 0:
            rest += take(resumed, 1)
        seen = head + rest[:-1]  # the last one opened epoch 1
        assert len(seen) == len(set(seen)), f"a sample came twice in the epoch resumed after {k} batches"
        missed = 30 - len(seen)
        assert missed <= workers * (buffer - 1), f"{missed} samples skipped when resuming after {k} batches"
        worst = max(worst, missed)
    assert buffer == 0 or worst > 0  # the bound is not vacuous: a buffered resume does skip


def test_a_corrupt_tar_member_and_a_missing_image_are_skipped_and_counted(tmp_path):
    import webdataset as wds

    paths = flat_photos(tmp_path / "photos", 10)
    (tmp_path / "shards").mkdir()
    with wds.TarWriter(str(tmp_path / "shards" / "train-000000.tar")) as sink:
        for i, p in enumerate(paths):
            sample = {"__key__": f"{i:08d}", "png": p.read_bytes(), "cls": 0}
            if i == 6:
                sample["png"] = b"\x89PNG not really"
            if i == 8:
                del sample["png"]  # a sample without its image
            sink.write(sample)
    stream, _ = open_stream(tmp_path / "shards")
    batches = StreamBatches(stream, 1, 0)
    with pytest.warns(UserWarning, match=r"skipping .*train-000000.tar#00000006"):
        seen = take(batches, 8)
    assert sorted(seen) == [0, 1, 2, 3, 4, 5, 7, 9]
    assert batches.num_skipped() == 2
    take(batches, 1)  # the next epoch starts: its counts add up
    state = json.loads(json.dumps(batches.state_dict()))
    resumed = StreamBatches(open_stream(tmp_path / "shards")[0], 1, 0)
    resumed.load_state_dict(state)
    assert resumed.num_skipped() == 2
    take(resumed, 7)
    assert resumed.num_skipped() == 4


def test_a_missing_or_empty_source_is_an_error_naming_it_before_any_model(tmp_path, monkeypatch):
    write_photos(tmp_path / "photos", n=2)
    base = ["data.source=hf", "data.dataset=webdataset", f"data.val_dir={tmp_path / 'photos'}"]
    with pytest.raises(FileNotFoundError, match=r"data.data_files: no file matches .*nowhere-\*.tar"):
        load_config(None, tiny_overrides(tmp_path, **{}) + base + [f"data.data_files={tmp_path}/nowhere-*.tar"])
    with pytest.raises(ValueError, match="data.val_split.*or data.val_dir"):
        load_config(None, ["data.source=hf", f"data.data_files={tmp_path}/photos/*.png"])
    (tmp_path / "empty.tar").write_bytes(b"")
    tarfile.open(tmp_path / "empty.tar", "w").close()
    cfg = load_config(None, tiny_overrides(tmp_path) + base + [f"data.data_files={tmp_path}/empty.tar"])
    import autoencoderkl.train as train

    monkeypatch.setattr(train, "build_vae", lambda *a, **k: pytest.fail("the model was built before the data check"))
    with pytest.raises(ValueError, match="holds no samples"):
        train.main(cfg, tmp_path / "run")


def shard_overrides(photos: Path, shards: Path, **extra) -> list[str]:
    values = {"data.source": "hf", "data.dataset": "webdataset",
              "data.data_files": f"{{train: '{shards}/train-*.tar', validation: '{shards}/validation-*.tar'}}",
              "data.val_split": "validation", "data.shuffle_buffer": 0, "data.num_workers": 2}
    values.update(extra)
    return tiny_overrides(photos) + [f"{k}={v}" for k, v in values.items()]


def test_training_on_shards_resumes_bit_exactly(tmp_path):
    """4 steps straight == 2 steps, a checkpoint, --resume latest, 2 more: the stream's position comes back."""
    from autoencoderkl.train import main
    from conftest import reset_accelerate_state

    write_photos(tmp_path / "photos", n=12, size=(20, 24))
    make_shards(tmp_path / "photos", tmp_path / "shards", shard_size=2, val_fraction=0.2)
    steps = {"train.validation_steps": 100}
    main(load_config(None, shard_overrides(tmp_path / "photos", tmp_path / "shards", **steps)), tmp_path / "straight")
    reset_accelerate_state()
    short = shard_overrides(tmp_path / "photos", tmp_path / "shards", **steps, **{"train.max_steps": 2})
    main(load_config(None, short), tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed/checkpoints/step-0000002/data_state/rank-00000.json").read_text())["state"]
    reset_accelerate_state()
    main(load_config(None, shard_overrides(tmp_path / "photos", tmp_path / "shards", **steps)), tmp_path / "resumed",
         resume="latest")
    a, b = (load_file(tmp_path / run / "checkpoints/step-0000004/model.safetensors") for run in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(line) for line in (tmp_path / "resumed/metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_images"] for r in logged if "loss" in r] == [0, 0, 0, 0]


DDP_DRIVER = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, sys.argv[3])
    from safetensors.torch import save_file
    from autoencoderkl.config import load_config
    from autoencoderkl.train import main
    from test_hf_data import shard_overrides
    from pathlib import Path

    out, photos, shards = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[4])
    summary = main(load_config(None, shard_overrides(photos, shards)), out)
    state = {f"vae.{k}": v for k, v in summary["vae"].state_dict().items()}
    state.update({f"disc.{k}": v for k, v in summary["discriminator"].named_parameters()})
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(out / f"rank{os.environ['RANK']}.safetensors"))
    """
)


def test_two_process_training_on_shards_ends_with_identical_weights_on_both_ranks(tmp_path):
    """torchrun + gloo, each rank streaming its own half of the shards; DDP all-reduces the gradients."""
    write_photos(tmp_path / "photos", n=10, size=(20, 24))
    make_shards(tmp_path / "photos", tmp_path / "shards", shard_size=2, val_fraction=0.2)  # 4 train shards
    driver = tmp_path / "driver.py"
    driver.write_text(DDP_DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([*torchrun(2), str(driver), str(tmp_path / "ddp"), str(tmp_path / "photos"),
                           str(Path(__file__).parent), str(tmp_path / "shards")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 read by this rank" in proc.stderr, "each rank did not stream its own 2 of the 4 shards"
    r0, r1 = (load_file(tmp_path / "ddp" / f"rank{r}.safetensors") for r in (0, 1))
    assert r0.keys() == r1.keys() and all(torch.equal(r0[k], r1[k]) for k in r0)
    for r in (0, 1):  # every rank wrote its own stream position
        assert (tmp_path / f"ddp/checkpoints/step-0000004/data_state/rank-{r:05d}.json").is_file()


def test_encoding_shards_gives_the_cache_of_the_folder_they_were_made_from(tmp_path):
    from test_latents import encode, shard_tensors, tiny_vae

    tiny_vae().save_pretrained(tmp_path / "vae")
    for k, name in enumerate(("cat", "dog")):
        write_photos(tmp_path / "photos" / name, n=5, seed=k)
    make_shards(tmp_path / "photos", tmp_path / "shards", shard_size=4)  # 3 tars: 4, 4, 2 images
    common = dict(batch_size=4, shard_size=4, hflip=True)
    folder = encode(tmp_path / "vae", tmp_path / "photos", tmp_path / "from-folder", **common)
    shards = encode(tmp_path / "vae", "hf:webdataset", tmp_path / "from-shards", num_workers=2, **common,
                    data_files=[str(tmp_path / "shards" / "train-*.tar")], label_column="cls")
    a, b = shard_tensors(tmp_path / "from-folder"), shard_tensors(tmp_path / "from-shards")
    assert a.keys() == b.keys() == {"mean", "std", "label"}
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs between the folder and its shards"
    assert shards["stats"] == folder["stats"] and shards["scaling_factor"] == folder["scaling_factor"]
    assert shards["classes"] == ["0", "1"] and len(shards["paths"]) == 10
    assert shards["paths"][0] == f"{tmp_path / 'shards' / 'train-000000.tar'}#00000000"
    assert shards["data"]["builder"] == "webdataset" and len(shards["data"]["data_files"]) == 3
    # Shard by shard: a lost cache shard is encoded again, the rest kept.
    (tmp_path / "from-shards" / "shard-00001.safetensors").unlink()
    (tmp_path / "from-shards" / "index.json").unlink()
    encode(tmp_path / "vae", "hf:webdataset", tmp_path / "from-shards", **common,
           data_files=[str(tmp_path / "shards" / "train-*.tar")], label_column="cls")
    assert torch.equal(shard_tensors(tmp_path / "from-shards")["mean"], a["mean"])
