"""KD Studio's engine: knowledge distillation and codistillation in pure PyTorch."""

__version__ = "0.1.0"
