"""`python -m sluice_client ...`: the command-line client (see sluice_client.cli)."""

from .cli import console_main

if __name__ == "__main__":
    console_main()
