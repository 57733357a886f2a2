"""YAML presets (package data): ``train/`` run presets and ``methods/`` per-method defaults."""
