"""The latent cache: encode once (1 or 2 processes, resumable), read back as a dataset."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file

import latent_diffusion.encode as writer
from autoencoderkl.data import UnreadableImageWarning
from autoencoderkl.model import load_vae, vae_weights_sha256
from conftest import write_photos
from latent_diffusion.encode import Source, encode_latents, list_sources, load_source
from latent_diffusion.latents import LatentDataset, load_index, map_shard

REPO = Path(__file__).resolve().parents[1]
RES = 16  # pixels; the tiny VAE downsamples 2x -> (4, 8, 8) latents


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=RES,
    ).eval()


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("vae")
    tiny_vae().save_pretrained(path)
    return path


def encode(vae_dir: Path, data: Path | str, out: Path, **kwargs) -> dict:
    kwargs = {"resolution": RES, "batch_size": 3, "shard_size": 4, "num_workers": 0, "cpu_threads": 1, **kwargs}
    return encode_latents(vae_dir, data, out, **kwargs)


def shard_tensors(out: Path) -> dict[str, torch.Tensor]:
    """Every shard of a cache, concatenated in order."""
    index = load_index(out)
    shards = [load_file(out / s["file"]) for s in index["shards"]]
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


def test_cache_matches_direct_encode_of_the_same_pixels(vae_dir, photo_dir, tmp_path):
    """Two DataLoader workers, 3 shards, batches of 3 that stop at shard ends."""
    write_photos(photo_dir, n=9, seed=1)  # 9 photos: shards of 4, 4, 1
    index = encode(vae_dir, photo_dir, tmp_path / "cache", num_workers=2)
    sources, labels, classes = list_sources(photo_dir, RES)
    assert index["paths"] == [s.name() for s in sources] and len(sources) == 9
    assert labels is None and "classes" not in index
    assert [s["num_latents"] for s in index["shards"]] == [4, 4, 1]
    assert index["latent_shape"] == [4, RES // 2, RES // 2] and index["num_latents"] == 9
    assert index["vae"]["sha256"] == vae_weights_sha256(tiny_vae())
    assert index["vae"]["config"]["block_out_channels"] == [8, 8]

    images = torch.stack([load_source(s, RES) for s in sources])  # (9, 3, 16, 16) in [-1, 1]
    with torch.no_grad():
        posterior = tiny_vae().encode(images).latent_dist
    cached = shard_tensors(tmp_path / "cache")
    assert cached["mean"].dtype == torch.float32 and "label" not in cached
    torch.testing.assert_close(cached["mean"], posterior.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached["std"], posterior.std, rtol=1e-5, atol=1e-5)


def test_load_source_resizes_the_shorter_side_and_centre_crops(tmp_path):
    img = Image.new("RGB", (60, 20), (255, 255, 255))
    img.paste((0, 0, 0), (0, 0, 10, 20))  # black left edge: outside the centre crop
    img.save(tmp_path / "wide.png")
    x = load_source(Source(tmp_path / "wide.png"), 8)  # 60 x 20 -> 24 x 8 -> centre 8 x 8
    assert x.shape == (3, 8, 8) and x.dtype == torch.float32
    assert torch.equal(x, torch.ones(3, 8, 8))


def test_statistics_equal_a_direct_computation(vae_dir, photo_dir, tmp_path):
    index = encode(vae_dir, photo_dir, tmp_path / "cache", hflip=True)
    t = {k: v.double() for k, v in shard_tensors(tmp_path / "cache").items()}
    mean, var = t["mean"], t["std"] ** 2  # (12, 4, 8, 8): 6 images x 2 views
    assert mean.shape == (12, 4, 8, 8)
    mu_c = mean.mean(dim=(0, 2, 3))
    std_c = ((mean**2 + var).mean(dim=(0, 2, 3)) - mu_c**2).sqrt()
    glob_std = ((mean**2 + var).mean() - mean.mean() ** 2).sqrt()
    stats = index["stats"]
    torch.testing.assert_close(torch.tensor(stats["mean"], dtype=torch.float64), mu_c)
    torch.testing.assert_close(torch.tensor(stats["std"], dtype=torch.float64), std_c)
    assert stats["global_mean"] == pytest.approx(mean.mean().item(), rel=1e-12)
    assert stats["global_std"] == pytest.approx(glob_std.item(), rel=1e-12)
    assert index["scaling_factor"] == pytest.approx(1 / glob_std.item(), rel=1e-12)
    assert index["shift_factor"] == pytest.approx(mean.mean().item(), rel=1e-12)
    assert stats["posterior_mean"]["global_std"] == pytest.approx(mean.std(unbiased=False).item(), rel=1e-9)

    # The same figure from posterior samples, as stage 2 draws them: unit std after scaling.
    torch.manual_seed(0)
    ds = LatentDataset(tmp_path / "cache", shift_factor=index["shift_factor"])
    z = torch.stack([ds[i]["latents"] for i in range(len(ds)) for _ in range(20)])
    assert z.std().item() == pytest.approx(1.0, abs=0.03) and abs(z.mean().item()) < 0.03


def test_two_processes_give_the_same_cache_as_one(vae_dir, photo_dir, tmp_path):
    """torchrun + gloo through the script: shards dealt round-robin, index from the main process."""
    write_photos(photo_dir, n=9, seed=1)
    one = encode(vae_dir, photo_dir, tmp_path / "one", shard_size=2, batch_size=2, dtype="fp16")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531",
         str(REPO / "scripts" / "encode_latents.py"), "--vae", str(vae_dir), "--data", str(photo_dir),
         "--out", str(tmp_path / "two"), "--resolution", str(RES), "--shard-size", "2", "--batch-size", "2",
         "--dtype", "fp16", "--num-workers", "0", "--cpu-threads", "1"],
        capture_output=True, text=True, timeout=240, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "5 shards of 2; 0 finished, 5 to encode (3 on rank 0 of 2" in proc.stderr
    assert "(2 on rank 1 of 2" in proc.stderr
    two = load_index(tmp_path / "two")
    assert two == one
    for s in one["shards"]:
        a, b = load_file(tmp_path / "one" / s["file"]), load_file(tmp_path / "two" / s["file"])
        assert a.keys() == b.keys() == {"mean", "std"}
        for k in a:
            assert a[k].dtype == torch.float16
            assert torch.equal(a[k], b[k]), f"{s['file']} {k} differs between 1 and 2 processes"


def test_interrupted_run_resumes_without_reencoding_finished_shards(vae_dir, photo_dir, tmp_path, monkeypatch):
    write_photos(photo_dir, n=10, seed=1)  # shards of 4: 4, 4, 2 images; batches of 3: 2 + 2 + 1 forwards
    reference = encode(vae_dir, photo_dir, tmp_path / "ref")
    calls = []
    real = writer.encode_batch

    def dies_on_the_fourth_forward(vae, images, hflip=False):  # a kill in the middle of shard 1
        calls.append(len(images))
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(vae, images, hflip)

    monkeypatch.setattr(writer, "encode_batch", dies_on_the_fourth_forward)
    out = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        encode(vae_dir, photo_dir, out)
    assert sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.safetensors"]
    with pytest.raises(FileNotFoundError, match="unfinished latent cache.*rerun"):
        load_index(out)
    leftovers = [".shard-00001.safetensors.tmp-4242.safetensors",  # as a kill mid-write leaves (atomic_path)
                 ".shard-00002.safetensors.tmp",  # ... or left by the writer before autoencoderkl.atomic
                 ".index.json.tmp-4242.json"]
    for name in leftovers:
        (out / name).write_bytes(b"half a file")
    first = (out / "shard-00000.safetensors").stat()

    calls.clear()
    monkeypatch.setattr(writer, "encode_batch", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k))
    index = encode(vae_dir, photo_dir, out)
    assert calls == [3, 1, 2], "only shards 1 and 2 are encoded again"
    again = (out / "shard-00000.safetensors").stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert not list(out.glob(".*.tmp*"))
    assert index == reference
    ref, new = shard_tensors(tmp_path / "ref"), shard_tensors(out)
    assert all(torch.equal(ref[k], new[k]) for k in ref)

    calls.clear()  # a finished cache: nothing to do
    assert encode(vae_dir, photo_dir, out) == reference and calls == []


def test_resuming_with_another_vae_or_other_settings_is_refused(vae_dir, photo_dir, tmp_path):
    out = tmp_path / "cache"
    encode(vae_dir, photo_dir, out)
    other = tmp_path / "other-vae"
    tiny_vae(seed=1).save_pretrained(other)
    with pytest.raises(ValueError, match="different VAE.*sha256"):
        encode(other, photo_dir, out)
    with pytest.raises(ValueError, match=r"other settings \(resolution: cache 16, now 32"):
        encode(vae_dir, photo_dir, out, resolution=32)
    write_photos(photo_dir, n=7, seed=2)  # one more image
    with pytest.raises(ValueError, match="changed since.*1 added"):
        encode(vae_dir, photo_dir, out)
    with pytest.raises(ValueError, match="not divisible by the VAE's downsampling factor 2"):
        encode(vae_dir, photo_dir, tmp_path / "odd", resolution=15)


def test_a_mismatched_vae_is_refused_by_the_dataset(vae_dir, photo_dir, tmp_path):
    out = tmp_path / "cache"
    index = encode(vae_dir, photo_dir, out)
    assert len(LatentDataset(out, vae=vae_dir)) == 6  # the right VAE, by path
    assert len(LatentDataset(out, vae=tiny_vae())) == 6  # ... or as a model
    other = tiny_vae(seed=1)
    with pytest.raises(ValueError, match="lat encode-latents") as err:
        LatentDataset(out, vae=other)
    assert index["vae"]["sha256"] in str(err.value) and vae_weights_sha256(other) in str(err.value)


def test_vae_hash_follows_the_weights_not_the_file(vae_dir, tmp_path):
    vae = tiny_vae()
    assert vae_weights_sha256(vae) == vae_weights_sha256(load_vae(vae_dir))
    vae.save_pretrained(tmp_path / "bin", safe_serialization=False)  # another file format
    assert vae_weights_sha256(load_vae(tmp_path / "bin")) == vae_weights_sha256(vae)
    with torch.no_grad():
        vae.decoder.conv_out.bias[0] += 1e-6
    assert vae_weights_sha256(vae) != vae_weights_sha256(tiny_vae())


def test_corrupt_images_are_skipped_and_counted(vae_dir, photo_dir, tmp_path):
    (photo_dir / "photo_00b.png").write_bytes(b"")  # zero bytes
    good = (photo_dir / "photo_01.png").read_bytes()
    (photo_dir / "photo_03b.png").write_bytes(good[: len(good) // 2])  # truncated: header fine
    with pytest.warns(UnreadableImageWarning) as record:
        index = encode(vae_dir, photo_dir, tmp_path / "cache", hflip=True, num_workers=1)
    messages = [str(w.message) for w in record]
    assert any("photo_00b.png" in m for m in messages) and any("photo_03b.png" in m for m in messages)
    assert any("skipped 2 of 8 images" in m for m in messages)
    assert index["num_skipped"] == 2
    assert sorted(Path(s["path"]).name for s in index["skipped"]) == ["photo_00b.png", "photo_03b.png"]
    assert [Path(p).name for p in index["paths"]] == [f"photo_{i:02d}.png" for i in range(6)]
    assert index["num_latents"] == 12 and [s["num_latents"] for s in index["shards"]] == [6, 6]
    ds = LatentDataset(tmp_path / "cache", sample_posterior=False, scaling_factor=1.0)
    assert ds.source(3) == (index["paths"][1], True)
    x = torch.stack([load_source(Source(Path(index["paths"][1])), RES)])
    with torch.no_grad():
        mirrored = tiny_vae().encode(x.flip(-1)).latent_dist.mean[0]
    torch.testing.assert_close(ds[3]["latents"], mirrored, rtol=1e-5, atol=1e-5)


def test_map_shard_reads_what_was_written_and_never_writes_the_file(vae_dir, tmp_path):
    data = tmp_path / "pets"
    write_photos(data / "cats", n=2, seed=1)
    write_photos(data / "dogs", n=1, seed=2)
    index = encode(vae_dir, data, tmp_path / "cache", dtype="bf16")
    path = tmp_path / "cache" / index["shards"][0]["file"]
    want = load_file(path)
    got = map_shard(path)
    assert got.keys() == want.keys() == {"mean", "std", "label"}
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    before = path.read_bytes()
    got["mean"].add_(1.0)  # copy-on-write: the process's view changes, the file does not
    got["label"][0] = 7
    assert path.read_bytes() == before
    assert torch.equal(load_file(path)["mean"], want["mean"])


def test_latent_dataset_draws_fresh_posterior_samples_or_returns_the_scaled_mean(vae_dir, photo_dir, tmp_path):
    out = tmp_path / "cache"
    index = encode(vae_dir, photo_dir, out)
    mean = shard_tensors(out)["mean"]
    scale = index["scaling_factor"]
    scale_of_means = 1 / index["stats"]["posterior_mean"]["global_std"]

    ds = LatentDataset(out)
    a, b = ds[2]["latents"], ds[2]["latents"]
    assert a.shape == (4, 8, 8) and a.dtype == torch.float32 and not torch.equal(a, b)
    assert ds.scaling_factor == scale and ds.shift_factor == 0.0 and set(ds[0]) == {"latents"}
    assert ds.latent_shape == (4, 8, 8) and ds.num_classes is None and ds.class_names is None

    det = LatentDataset(out, sample_posterior=False)
    assert det.scaling_factor == scale_of_means and det.shift_factor == 0.0
    assert torch.equal(det[2]["latents"], mean[2] * scale_of_means)
    assert torch.equal(det[-1]["latents"], mean[5] * scale_of_means)
    shifted = LatentDataset(out, sample_posterior=False, scaling_factor=0.5, shift_factor=0.25)
    assert torch.equal(shifted[2]["latents"], (mean[2] - 0.25) * 0.5)
    with pytest.raises(IndexError):
        det[6]

    loader = torch.utils.data.DataLoader(det, batch_size=4, num_workers=2)  # shards opened in each worker
    batches = list(loader)
    torch.testing.assert_close(torch.cat([b["latents"] for b in batches]), mean * scale_of_means)


def test_default_scaling_gives_unit_variance_for_posterior_samples_and_for_means(vae_dir, photo_dir, tmp_path):
    """1 / std of what each mode returns: samples z = mean + std * eps, or the means alone."""
    out = tmp_path / "cache"
    index = encode(vae_dir, photo_dir, out, hflip=True)
    means = LatentDataset(out, sample_posterior=False)
    x = torch.stack([means[i]["latents"] for i in range(len(means))]).double()  # (12, 4, 8, 8)
    assert x.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    # The means spread less than the samples (by the posterior's variance): a larger factor.
    assert means.scaling_factor > 1.5 * index["scaling_factor"]

    torch.manual_seed(0)
    samples = LatentDataset(out)
    assert samples.scaling_factor == index["scaling_factor"]  # index.json keeps the samples' factor
    z = torch.stack([samples[i]["latents"] for i in range(len(samples)) for _ in range(20)]).double()
    assert z.std(unbiased=False).item() == pytest.approx(1.0, abs=0.03)


def test_dataset_holds_no_source_list_and_pickles_without_open_shards(vae_dir, photo_dir, tmp_path):
    """What a DataLoader worker gets: shard names and offsets, not index["paths"] (one string per image)."""
    out = tmp_path / "cache"
    index = encode(vae_dir, photo_dir, out, hflip=True)
    ds = LatentDataset(out, sample_posterior=False)
    rows = [ds[i]["latents"] for i in range(len(ds))]  # every shard mapped in this process
    assert "index" not in vars(ds) and ds.index == index == load_index(out)

    def holds_a_source_path(blob: bytes) -> bool:
        return any(Path(p).name.encode() in blob for p in index["paths"])

    assert not holds_a_source_path(pickle.dumps(ds))
    assert ds.source(3) == (index["paths"][1], True) and ds.source(-1) == (index["paths"][-1], True)
    with pytest.raises(IndexError):
        ds.source(len(ds))
    blob = pickle.dumps(ds)  # after source(): the list read for it stays in this process
    assert not holds_a_source_path(blob)
    copy = pickle.loads(blob)
    assert all(torch.equal(copy[i]["latents"], rows[i]) for i in range(len(ds)))
    assert copy.source(2) == (index["paths"][1], False)


def test_class_subfolders_become_labels(vae_dir, tmp_path):
    data = tmp_path / "pets"
    write_photos(data / "dogs", n=2, seed=1)
    write_photos(data / "cats", n=3, seed=2)
    index = encode(vae_dir, data, tmp_path / "cache", shard_size=2, hflip=True)
    assert index["classes"] == ["cats", "dogs"]
    labels = shard_tensors(tmp_path / "cache")["label"]
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1]
    ds = LatentDataset(tmp_path / "cache")
    assert ds.num_classes == 2 and ds.class_names == ["cats", "dogs"]
    item = ds[7]
    assert item["label"].dtype == torch.int64 and item["label"].shape == () and item["label"].item() == 1


def test_load_index_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no latent cache.*lat encode-latents"):
        load_index(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format_version 99"):
        load_index(tmp_path)
    with pytest.raises(ValueError, match="dtype must be one of"):
        encode_latents("unused", tmp_path, tmp_path / "x", dtype="float64")


def test_demo_is_a_fixed_set_of_labelled_tiles_inside_their_photos():
    pytest.importorskip("skimage")
    sources, labels, classes = list_sources("demo", 64)
    assert len(sources) == 308 and len(labels) == 308
    assert classes[:2] == ["astronaut", "rocket"] and len(classes) == 9 and set(labels) == set(range(9))
    assert sources[0].name().endswith("astronaut.png#resize128_y0_x0")
    for s in sources:
        with Image.open(s.path) as im:
            rw, rh = TF.resize(Image.new("L", im.size), s.resize).size  # as load_source resizes
        assert 0 <= s.top <= rh - 64 and 0 <= s.left <= rw - 64, s
    assert list_sources("demo", 64) == (sources, labels, classes)


def test_benchmark_encode_writes_both_rates_and_the_environment(vae_dir, photo_dir, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark", REPO / "scripts" / "benchmark.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    out = tmp_path / "bench.json"
    benchmark.main(["--what", "encode", "--vae", str(vae_dir), "--data", str(photo_dir), "--num-images", "5",
                    "--resolution", str(RES), "--batch-size", "2", "--num-workers", "0", "--cpu-threads", "1",
                    "--repeats", "2", "--warmup", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["what"] == "encode" and report["settings"]["num_images"] == 5
    median = {}
    for case in ("end_to_end", "pure_encode"):
        result = report["results"][case]
        assert result["items"] == 5 and len(result["seconds"]) == 2
        median[case] = sum(result["seconds"]) / 2  # recomputed from the timings (rounded to 0.1 ms)
        assert 5 / result["items_per_s"] == pytest.approx(median[case], abs=1e-4)
        assert (5 / result["items_per_s_max"], 5 / result["items_per_s_min"]) == (
            pytest.approx(min(result["seconds"]), abs=1e-4), pytest.approx(max(result["seconds"]), abs=1e-4))
    env = report["environment"]
    assert env["device"] == "cpu" and env["torch_threads"] == 1 and env["versions"]["torch"] == torch.__version__
    rounding = 1e-4 / median["pure_encode"] + 1e-4 / median["end_to_end"]
    assert report["end_to_end_over_pure"] == pytest.approx(median["pure_encode"] / median["end_to_end"], rel=rounding)
    assert "end to end / pure" in capsys.readouterr().out
