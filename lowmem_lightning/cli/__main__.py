"""``python -m lowmem_lightning.cli``: the same entry point as the ``lowmem`` command."""

from lowmem_lightning.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
