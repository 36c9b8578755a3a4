"""The model store side of llamachat: sources and conversion. Nothing here imports torch."""
