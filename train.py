"""`python train.py ...` in a checkout runs `difflab.train`, the same as the console command `difflab-train`."""

from difflab.train import main

if __name__ == "__main__":
    main()
