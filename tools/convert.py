#!/usr/bin/env python3
"""`python tools/convert.py SRC OUT [--outtype ...]`: the same converter as `ossrt convert SRC -o OUT`."""

import sys

from ossrt.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) >= 2 and not args[0].startswith("-") and not args[1].startswith("-"):
        args = [args[0], "-o", args[1]] + args[2:]
    main(["convert"] + args)
