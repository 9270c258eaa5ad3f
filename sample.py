"""`python sample.py ...` in a checkout runs `difflab.sample`, the same as the console command `difflab-sample`."""

from difflab.sample import main

if __name__ == "__main__":
    main()
