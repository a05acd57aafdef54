"""finetune: personal DreamBooth + LoRA fine-tuning for Stable Diffusion."""

__version__ = "0.1.0"
