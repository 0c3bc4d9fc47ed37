"""Seed usage: `python client.py "Hello world" 10` streams 10 tokens from 127.0.0.1:8000."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
from skynet.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["client", *sys.argv[1:]]))
