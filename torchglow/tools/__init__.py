"""What to do with a model: fast inference, sampling, evaluation, latent tools, OOD, images, conversion."""
