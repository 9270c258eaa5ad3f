"""`python ablate.py ...` in a checkout runs `difflab.ablate`, the same as the console command `difflab-ablate`."""

from difflab.ablate import main

if __name__ == "__main__":
    main()
