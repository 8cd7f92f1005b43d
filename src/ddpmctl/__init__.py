"""ddpmctl: train Denoising Diffusion Probabilistic Models and sample from them."""

__version__ = "0.1.0"
