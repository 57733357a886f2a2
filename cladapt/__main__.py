"""``python -m cladapt`` (so ``accelerate launch -m cladapt train ...`` works)."""

from cladapt.cli import main

if __name__ == "__main__":
    main()
