"""The `llamachat` command line. Thin commands over the store, the settings and the engine."""
