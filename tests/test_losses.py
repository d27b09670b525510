"""Tests for the PatchGAN discriminator and AutoencoderLoss (CPU, tiny tensors, seeded).

LPIPS is built with a random VGG16 backbone (``pnet_rand=True``): the ImageNet weights are
not downloaded in tests.
"""

from __future__ import annotations

import math
import socket
import urllib.error

import lpips
import pytest
import torch
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import nn

from autoencoderkl import losses
from autoencoderkl.config import LossConfig
from autoencoderkl.discriminator import NLayerDiscriminator
from autoencoderkl.losses import AutoencoderLoss, build_perceptual, hinge_d_loss, vanilla_d_loss


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def random_lpips():
    return lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval().requires_grad_(False)


class CountingDiscriminator(nn.Module):
    """A one-conv patch discriminator that counts its forward calls."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.conv(x)


def posterior_of(B=2, c=4, h=4, w=4):
    mean, logvar = torch.randn(B, c, h, w), 0.5 * torch.randn(B, c, h, w)
    return DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1)), mean, logvar


def toy_batch(B=2, H=16):
    """A toy decoder (one conv: the last layer) and its reconstruction of random images."""
    decoder = nn.Conv2d(4, 3, 3, padding=1)
    z = torch.randn(B, 4, H, H)
    x = torch.rand(B, 3, H, H) * 2 - 1
    return decoder, x, torch.tanh(decoder(z))


# --- discriminator -------------------------------------------------------------------


@pytest.mark.parametrize("size, out", [(64, 6), (256, 30)])
def test_discriminator_output_shape(size, out):
    d = NLayerDiscriminator(in_channels=3, ndf=8, n_layers=3)
    with torch.no_grad():
        logits = d(torch.rand(2, 3, size, size) * 2 - 1)
    assert logits.shape == (2, 1, out, out)


def test_discriminator_layout_and_weights_init():
    d = NLayerDiscriminator(ndf=64, n_layers=3)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in d.modules() if isinstance(m, nn.BatchNorm2d)]
    assert [c.out_channels for c in convs] == [64, 128, 256, 512, 1]
    assert [c.stride[0] for c in convs] == [2, 2, 2, 1, 1]
    assert [c.bias is not None for c in convs] == [True, False, False, False, True]
    assert len(norms) == 3
    big = convs[3].weight  # 512 x 256 x 4 x 4: two million samples
    assert abs(big.mean().item()) < 1e-3
    assert big.std().item() == pytest.approx(0.02, rel=0.02)
    bn_w = torch.cat([n.weight for n in norms])
    assert bn_w.mean().item() == pytest.approx(1.0, abs=0.01)
    assert bn_w.std().item() == pytest.approx(0.02, rel=0.2)
    assert all(torch.all(n.bias == 0) for n in norms)


# --- GAN losses ----------------------------------------------------------------------


def test_hinge_and_vanilla_d_loss_on_hand_examples():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    # relu(1 - real) = [0, 0.5, 2] -> 5/6; relu(1 + fake) = [0, 1, 2] -> 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5 * (5 / 6 + 1))
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = 0.5 * (sum(sp(-r) for r in (2.0, 0.5, -1.0)) / 3 + sum(sp(f) for f in (-2.0, 0.0, 1.0)) / 3)
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected)
    # a perfect discriminator pays nothing under the hinge
    assert hinge_d_loss(torch.full((4,), 3.0), torch.full((4,), -3.0)).item() == 0.0


# --- generator loss terms ------------------------------------------------------------


def test_kl_matches_closed_form():
    posterior, mu, logvar = posterior_of(B=3)
    cfg = LossConfig(kl_weight=0.25, perceptual_weight=0.0)
    loss_fn = AutoencoderLoss(cfg, perceptual=None)
    x = torch.rand(3, 3, 8, 8) * 2 - 1
    loss, logs = loss_fn.generator_loss(x, x.clone(), posterior, 0, None, None)
    by_hand = 0.5 * torch.sum(mu**2 + logvar.exp() - 1 - logvar).item() / 3
    assert logs["kl_loss"] == pytest.approx(by_hand, rel=1e-5)
    assert logs["nll_loss"] == 0.0  # x_hat == x and logvar 0
    assert loss.item() == pytest.approx(0.25 * by_hand, rel=1e-5)


def test_nll_reduction_is_sum_over_pixels_mean_over_batch():
    B, H, W = 4, 6, 5
    posterior, _, _ = posterior_of(B=B)
    x = torch.zeros(B, 3, H, W)
    x_hat = torch.full((B, 3, H, W), 0.5)
    loss_fn = AutoencoderLoss(LossConfig(perceptual_weight=0.0), perceptual=None)
    _, logs = loss_fn.generator_loss(x, x_hat, posterior, 0, None, None)
    assert logs["nll_loss"] == pytest.approx(0.5 * 3 * H * W)
    assert logs["rec_loss"] == pytest.approx(0.5)
    # l2 and a non-zero logvar: rec / e^logvar + logvar, each summed over pixels
    loss_fn = AutoencoderLoss(LossConfig(perceptual_weight=0.0, pixel_loss="l2", logvar_init=1.0), perceptual=None)
    _, logs = loss_fn.generator_loss(x, x_hat, posterior, 0, None, None)
    assert logs["nll_loss"] == pytest.approx((0.25 / math.e + 1.0) * 3 * H * W, rel=1e-6)
    assert logs["logvar"] == 1.0


@pytest.mark.parametrize("pixel_loss", ["l1", "l2"])
def test_chroma_term_weighs_colour_errors_and_leaves_grey_errors_alone(pixel_loss):
    B, H, W = 2, 4, 4
    posterior, _, _ = posterior_of(B=B)
    x = torch.zeros(B, 3, H, W)
    grey_error = torch.full((B, 3, H, W), 0.2)  # equal on R, G, B: luminance only, Cb = Cr = 0
    red_error = torch.zeros(B, 3, H, W)
    red_error[:, 0] = 0.2  # red alone: Cb = -0.0337, Cr = +0.1
    plain = AutoencoderLoss(LossConfig(perceptual_weight=0.0, pixel_loss=pixel_loss), perceptual=None)
    chroma = AutoencoderLoss(LossConfig(perceptual_weight=0.0, pixel_loss=pixel_loss, chroma_weight=4.0),
                             perceptual=None)

    def nll(fn, x_hat):
        return fn.generator_loss(x, x_hat, posterior, 0, None, None)[1]["nll_loss"]

    assert nll(chroma, x + grey_error) == pytest.approx(nll(plain, x + grey_error), rel=1e-6)
    cb, cr = -0.168736 * 0.2, 0.5 * 0.2
    per_pixel = abs(cb) + abs(cr) if pixel_loss == "l1" else cb**2 + cr**2
    assert nll(chroma, x + red_error) - nll(plain, x + red_error) == pytest.approx(4.0 * per_pixel * H * W, rel=1e-5)


def test_logvar_trains_only_when_asked():
    assert not AutoencoderLoss(LossConfig(), None).logvar.requires_grad
    learned = AutoencoderLoss(LossConfig(learn_logvar=True, logvar_init=-0.5), None)
    assert learned.logvar.requires_grad and learned.logvar.item() == -0.5


def test_adaptive_weight_matches_hand_computation():
    decoder, x, x_hat = toy_batch()
    d = CountingDiscriminator()
    nll = (x - x_hat).abs().sum()
    g = -d(x_hat).mean()
    w = decoder.weight
    gn = torch.autograd.grad(nll, w, retain_graph=True)[0]
    gg = torch.autograd.grad(g, w, retain_graph=True)[0]
    cfg = LossConfig(disc_weight=0.5)
    loss_fn = AutoencoderLoss(cfg, None)
    expected = (gn.norm() / (gg.norm() + 1e-4)).clamp(0, 1e4) * 0.5
    got = loss_fn.calculate_adaptive_weight(nll, g, w)
    assert not got.requires_grad
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0 < got.item() < 0.5 * 1e4
    # a vanishing GAN gradient hits the upper clamp
    tiny = loss_fn.calculate_adaptive_weight(nll, 1e-12 * g, w)
    assert tiny.item() == pytest.approx(1e4 * 0.5)


# --- GAN schedule --------------------------------------------------------------------


def test_discriminator_is_silent_before_disc_start():
    cfg = LossConfig(perceptual_weight=0.0, disc_start=10)
    loss_fn = AutoencoderLoss(cfg, None)
    decoder, x, x_hat = toy_batch()
    d = CountingDiscriminator()
    posterior, _, _ = posterior_of()
    loss, logs = loss_fn.generator_loss(x, x_hat, posterior, 9, decoder.weight, d)
    assert logs["g_loss"] == 0.0 and logs["d_weight"] == 0.0 and logs["disc_factor"] == 0.0
    assert loss.item() == pytest.approx(logs["nll_loss"] + cfg.kl_weight * logs["kl_loss"], rel=1e-6)
    d_loss, d_logs = loss_fn.discriminator_loss(x, x_hat, 9, d)
    assert d_loss.item() == 0.0 and not d_loss.requires_grad and d_logs["d_loss"] == 0.0
    assert d.calls == 0
    # no last_layer is fine while the GAN is off
    loss_fn.generator_loss(x, x_hat, posterior, 9, None, d)


def test_discriminator_is_active_from_disc_start():
    cfg = LossConfig(perceptual_weight=0.0, disc_start=10, disc_factor=1.0)
    loss_fn = AutoencoderLoss(cfg, None)
    decoder, x, x_hat = toy_batch()
    d = CountingDiscriminator()
    posterior, _, _ = posterior_of()
    loss, logs = loss_fn.generator_loss(x, x_hat, posterior, 10, decoder.weight, d)
    assert d.calls == 1
    assert logs["g_loss"] != 0.0 and logs["d_weight"] > 0.0 and logs["disc_factor"] == 1.0
    expected = logs["nll_loss"] + cfg.kl_weight * logs["kl_loss"] + logs["d_weight"] * logs["g_loss"]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    d_loss, d_logs = loss_fn.discriminator_loss(x, x_hat, 11, d)
    assert d.calls == 3  # real and fake in two separate calls
    assert d_loss.requires_grad and d_loss.item() > 0
    assert d_logs["d_loss"] == pytest.approx(d_loss.item())
    with pytest.raises(ValueError, match="last_layer"):
        loss_fn.generator_loss(x, x_hat, posterior, 10, None, d)


def test_generator_pass_leaves_discriminator_grads_untouched():
    cfg = LossConfig(perceptual_weight=0.0, disc_start=0)
    loss_fn = AutoencoderLoss(cfg, None)
    decoder, x, x_hat = toy_batch(H=32)
    d = NLayerDiscriminator(ndf=8, n_layers=2)
    d.main[0].weight.requires_grad_(False)  # a mixed set of flags must come back as it was
    flags = [p.requires_grad for p in d.parameters()]
    seen = []
    d.register_forward_pre_hook(lambda m, a: seen.append([p.requires_grad for p in m.parameters()]))
    posterior, _, _ = posterior_of()
    loss, logs = loss_fn.generator_loss(x, x_hat, posterior, 0, decoder.weight, d)
    loss.backward()
    assert seen == [[False] * len(flags)]  # frozen during its forward
    assert [p.requires_grad for p in d.parameters()] == flags
    assert all(p.grad is None for p in d.parameters())
    assert decoder.weight.grad is not None and logs["d_weight"] > 0


def test_discriminator_step_leaves_autoencoder_grads_untouched():
    cfg = LossConfig(perceptual_weight=0.0, disc_start=0)
    loss_fn = AutoencoderLoss(cfg, None)
    decoder, x, x_hat = toy_batch(H=32)
    d = NLayerDiscriminator(ndf=8, n_layers=2)
    d_loss, _ = loss_fn.discriminator_loss(x, x_hat, 0, d)
    d_loss.backward()
    assert decoder.weight.grad is None and decoder.bias.grad is None
    assert all(p.grad is not None for p in d.parameters())


# --- perceptual term -----------------------------------------------------------------


def test_perceptual_term_reaches_decoder_gradient(random_lpips):
    vae = AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
        block_out_channels=[8, 16], latent_channels=4, norm_num_groups=4, layers_per_block=1,
    )
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    posterior = vae.encode(x).latent_dist
    x_hat = vae.decode(posterior.mode()).sample
    last = vae.decoder.conv_out.weight
    grads = {}
    for w in (0.0, 1.0):
        loss_fn = AutoencoderLoss(LossConfig(perceptual_weight=w, kl_weight=0.0), random_lpips)
        loss, logs = loss_fn.generator_loss(x, x_hat, posterior, 0, last, None)
        grads[w] = torch.autograd.grad(loss, last, retain_graph=True)[0]
        assert (logs["p_loss"] > 0) == (w > 0)
    assert not torch.allclose(grads[0.0], grads[1.0])
    # with no LPIPS module the term is off whatever the weight says
    off = AutoencoderLoss(LossConfig(perceptual_weight=1.0, kl_weight=0.0), None)
    loss, logs = off.generator_loss(x, x_hat, posterior, 0, last, None)
    assert logs["p_loss"] == 0.0
    assert torch.allclose(torch.autograd.grad(loss, last)[0], grads[0.0])


def test_loss_module_keeps_lpips_in_eval_mode(random_lpips):
    loss_fn = AutoencoderLoss(LossConfig(), random_lpips).train()
    assert loss_fn.training and not loss_fn.perceptual.training
    assert not any(p.requires_grad for p in loss_fn.perceptual.parameters())


def test_build_perceptual_false_is_frozen_random_backbone():
    module, description = build_perceptual("false")
    assert isinstance(module, lpips.LPIPS) and module.pnet_rand
    assert not module.training
    assert not any(p.requires_grad for p in module.parameters())
    assert "test" in description
    with pytest.raises(ValueError, match="perceptual_pretrained"):
        build_perceptual("yes")


@pytest.fixture
def empty_torch_home(tmp_path, monkeypatch):
    """TORCH_HOME -> an empty dir, and downloads fail at once (no network, ever, in tests)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    # torch.hub.set_dir, undone after the test
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    attempts = []

    def no_download(url, dst, *args, **kwargs):
        attempts.append((url, socket.getdefaulttimeout()))
        raise urllib.error.URLError("no network in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    return tmp_path / "hub" / "checkpoints", attempts


def test_build_perceptual_true_names_missing_weights(empty_torch_home):
    where, attempts = empty_torch_home
    before = socket.getdefaulttimeout()
    with pytest.raises(RuntimeError) as info:
        build_perceptual("true")
    message = str(info.value)
    assert losses.VGG16_FILE in message and "vgg16" in losses.VGG16_FILE
    assert str(where) in message and losses.VGG16_URL in message and "TORCH_HOME" in message
    assert attempts == [(losses.VGG16_URL, losses.DOWNLOAD_TIMEOUT_S)]  # tried, with a timeout
    assert socket.getdefaulttimeout() == before  # and restored


def test_build_perceptual_auto_switches_off_with_warning(empty_torch_home):
    where, _ = empty_torch_home
    with pytest.warns(UserWarning, match="SWITCHED OFF") as record:
        module, description = build_perceptual("auto")
    assert module is None
    assert losses.VGG16_FILE in description
    assert any(str(where) in str(r.message) for r in record)


def test_build_perceptual_true_loads_a_cached_vgg16_without_unpickling(empty_torch_home):
    """The real path, offline: a cached VGG16 file (random stand-in weights here) becomes the
    LPIPS backbone exactly, read with weights_only=True; nothing is downloaded."""
    where, attempts = empty_torch_home
    where.mkdir(parents=True)
    torch.manual_seed(0)
    from torchvision.models import vgg16

    state = vgg16().state_dict()
    torch.save(state, where / losses.VGG16_FILE)
    module, description = build_perceptual("true")
    assert attempts == [] and "cached" in description
    assert torch.equal(module.net.slice1[0].weight, state["features.0.weight"])
    assert torch.equal(dict(module.net.slice5.named_children())["28"].bias, state["features.28.bias"])
    # Same distances as lpips' own loader given the same backbone.
    reference = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    for block in (reference.net.slice1, reference.net.slice2, reference.net.slice3, reference.net.slice4, reference.net.slice5):
        for index, layer in block.named_children():
            for name, param in layer.named_parameters(recurse=False):
                param.data.copy_(state[f"features.{index}.{name}"])
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(module(x, y), reference(x, y))

    # A file holding pickled objects besides tensors is refused, not executed.
    (where / losses.VGG16_FILE).unlink()
    torch.save({"features.0.weight": torch.zeros(1), "evil": socket.socket}, where / losses.VGG16_FILE)
    with pytest.raises(RuntimeError, match="could not be loaded"):
        build_perceptual("true")


# --- shared backward -----------------------------------------------------------------


@pytest.mark.parametrize("learn_logvar", [False, True])
def test_shared_backward_gives_ldm_gradients_with_fewer_flops(random_lpips, learn_logvar):
    """One LPIPS + PatchGAN backward gives LDM's gradients, loss value and adaptive weight."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = LossConfig(disc_start=0, kl_weight=1e-3, learn_logvar=learn_logvar, logvar_init=0.3)
    vae = AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4)
    d = NLayerDiscriminator(ndf=8, n_layers=2)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    eps = torch.randn(2, 4, 16, 16)
    results = {}
    for shared in (False, True):
        loss_fn = AutoencoderLoss(cfg, random_lpips)
        vae.zero_grad(set_to_none=True)
        with FlopCounterMode(display=False) as flops:
            posterior = vae.encode(x).latent_dist
            x_hat = vae.decode(posterior.mean + posterior.std * eps).sample
            loss, logs = loss_fn.generator_loss(x, x_hat, posterior, 0, vae.decoder.conv_out.weight, d, shared)
            loss.backward()
        grads = [p.grad.clone() for p in vae.parameters()]
        results[shared] = (loss.item(), logs, grads, loss_fn.logvar.grad, flops.get_total_flops())
    (loss0, logs0, grads0, lv0, flops0), (loss1, logs1, grads1, lv1, flops1) = results[False], results[True]
    assert logs1["d_weight"] == pytest.approx(logs0["d_weight"], rel=1e-5) and logs1["d_weight"] > 0
    assert loss1 == pytest.approx(loss0, rel=1e-6) and logs1["loss"] == pytest.approx(logs0["loss"], rel=1e-6)
    scale = max(g.abs().max().item() for g in grads0)
    for g0, g1 in zip(grads0, grads1):  # equal up to fp32 summation order
        torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-5 * scale)
    if learn_logvar:
        torch.testing.assert_close(lv1, lv0)
    else:
        assert lv0 is None and lv1 is None
    assert all(p.grad is None for p in d.parameters())
    assert flops1 < 0.85 * flops0  # one LPIPS and one PatchGAN backward fewer
