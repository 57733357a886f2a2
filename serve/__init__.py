"""cladapt subpackage."""
