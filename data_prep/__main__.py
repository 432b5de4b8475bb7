import sys

from data_prep.cli import main

if __name__ == "__main__":  # img2dataset spawns workers: keep this guard
    sys.exit(main())
