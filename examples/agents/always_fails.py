"""always_fails: exits with code 1 at once (a command that can never start).

Run: python3 examples/agents/always_fails.py
"""

import sys

if __name__ == "__main__":
    print("always_fails: failing at once", file=sys.stderr)
    sys.exit(1)
