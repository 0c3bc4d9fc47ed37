"""Seed usage: `python skynode.py 0` starts a node named 0 that joins 127.0.0.1:7000."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "src"))
from skynet.cli import main  # noqa: E402

if __name__ == "__main__":
    args = sys.argv[1:]
    name = ["--name", args.pop(0)] if args and not args[0].startswith("-") else []
    sys.exit(main(["node", *name, *args]))
