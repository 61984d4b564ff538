"""Recovery: masked LoRA, rank allocation and the ``losa recover`` (LoSA) workflow."""
