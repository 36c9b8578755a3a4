"""`llamachat create`: models made from an installed base, LoRA adapters and defaults."""
