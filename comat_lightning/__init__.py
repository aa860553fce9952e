"""comat-lightning: CoMat and A-STAR prompt alignment for Stable Diffusion, on PyTorch Lightning."""

__version__ = "0.1.0"
