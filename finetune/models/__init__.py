"""Base models: loading (`load_base`) and the embedded tiny SD 1.x."""

from finetune.models.load import Base, load_base

__all__ = ["Base", "load_base"]
