"""Stage 2: latent diffusion on cached AutoencoderKL latents (latent_diffusion -> autoencoderkl, never back)."""
