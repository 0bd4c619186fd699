"""``python -m medtl``: the CLI, as torchrun starts each process of a DDP run."""

from medtl.cli import main

if __name__ == "__main__":
    main()
