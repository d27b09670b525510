"""Stage 1: the Stable-Diffusion-style AutoencoderKL, its losses, data and training loop."""
