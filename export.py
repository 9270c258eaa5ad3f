"""`python export.py ...` in a checkout runs `difflab.export`, the same as the console command `difflab-export`."""

from difflab.export import main

if __name__ == "__main__":
    main()
