"""Adapters for the stacks users train with (HF Trainer/TRL, DDP/FSDP2); optional dependencies imported lazily."""
