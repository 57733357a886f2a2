"""cladapt: parameter-efficient adapters for continual fine-tuning."""
__version__ = "0.1.0"
