"""Training: the LoRA recipe (`finetune.train.lora.train`) and the small helpers it reads top to bottom."""
