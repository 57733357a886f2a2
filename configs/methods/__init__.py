"""Per-method YAML presets (package data): ``<method>.yaml`` holds the method's defaults."""
