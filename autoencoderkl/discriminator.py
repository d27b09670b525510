"""PatchGAN discriminator for the adversarial term of the autoencoder loss.

The "NLayerDiscriminator" of pix2pix (Isola et al. 2017, "Image-to-Image Translation with
Conditional Adversarial Networks"), in the form taming-transformers and CompVis
latent-diffusion use for their first-stage models: a stack of 4x4 convolutions that maps an
image to a grid of real/fake logits, one per overlapping patch (70x70 pixels receptive
field at ``n_layers=3``).

Multi-process runs: the layers are plain ``nn.BatchNorm2d``. The training loop converts
them with ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` when it runs on more than one
process (SyncBatchNorm refuses CPU tensors, so it cannot be done here unconditionally).
"""

from __future__ import annotations

from torch import Tensor, nn


def weights_init(module: nn.Module) -> None:
    """DCGAN-style initialisation, as pix2pix / taming-transformers.

    Conv weights ~ N(0, 0.02) (conv biases keep PyTorch's default); BatchNorm weights
    ~ N(1, 0.02), BatchNorm biases 0. Use with ``model.apply(weights_init)``.

    Args:
        module: any module; only ``nn.Conv2d`` and ``nn.BatchNorm2d`` are touched.
    """
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (Isola et al. 2017; taming-transformers / LDM layout).

    Layers (all 4x4 convolutions, padding 1; ``mult_n = min(2**n, 8)``):

    - conv ``in_channels -> ndf``, stride 2, bias, no norm, LeakyReLU(0.2);
    - for n = 1 .. n_layers - 1: conv ``ndf*mult_{n-1} -> ndf*mult_n``, stride 2, no bias,
      BatchNorm2d, LeakyReLU(0.2);
    - conv ``-> ndf*mult_{n_layers}``, stride 1, no bias, BatchNorm2d, LeakyReLU(0.2);
    - conv ``-> 1`` channel, stride 1, bias: the patch logits.

    Each stride-2 conv halves H and W; each stride-1 conv removes one pixel. With
    ``n_layers=3``: 256x256 -> 30x30 logits, 64x64 -> 6x6 logits, and each logit sees a
    70x70 patch of the input.

    Multi-process: convert the BatchNorm layers with
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` in the training loop (GPU only).

    Args:
        in_channels: channels of the images judged (3 for RGB).
        ndf: channels of the first conv; later layers use up to ``8 * ndf``.
        n_layers: number of stride-2 convolutions (3 in LDM's kl-f8 recipe).
    Raises:
        ValueError: if ``n_layers < 1`` or ``ndf < 1``.
    """

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3) -> None:
        super().__init__()
        if n_layers < 1 or ndf < 1:
            raise ValueError(f"NLayerDiscriminator needs n_layers >= 1 and ndf >= 1, got {n_layers=}, {ndf=}")
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, ndf, kernel_size=4, stride=2, padding=1),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        mult = 1
        for n in range(1, n_layers):  # stride-2 blocks with BatchNorm
            prev, mult = mult, min(2**n, 8)
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, inplace=True),
            ]
        prev, mult = mult, min(2**n_layers, 8)
        layers += [
            nn.Conv2d(ndf * prev, ndf * mult, kernel_size=4, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ndf * mult),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * mult, 1, kernel_size=4, stride=1, padding=1),  # patch logits
        ]
        self.main = nn.Sequential(*layers)
        self.apply(weights_init)

    def forward(self, x: Tensor) -> Tensor:
        """Patch logits of an image batch.

        Args:
            x: (B, C, H, W) float images in [-1, 1] (real inputs or reconstructions).
        Returns:
            (B, 1, H', W') unnormalised logits, one per patch (higher = "real"); for
            ``n_layers=3``, H' = H / 8 - 2, i.e. 30x30 for a 256x256 input.
        """
        return self.main(x)
