"""Seed usage: `python server.py` starts the server with the default model on 127.0.0.1."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
from skynet.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["server", *sys.argv[1:]]))
