"""Diffusion prior: EDM U-Net, loss, training, checkpoints."""
