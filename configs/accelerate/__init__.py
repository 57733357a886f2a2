"""accelerate launch configs (multi-process.yaml)."""
