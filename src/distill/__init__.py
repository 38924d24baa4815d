"""distill: model distillation in production."""
__version__ = "0.1.0"
