"""The command-line layer above both stage packages (``autoencoderkl``, ``latent_diffusion``)."""
