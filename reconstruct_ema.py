"""`python reconstruct_ema.py ...` in a checkout runs `difflab.reconstruct_ema`, the same as the console command
`difflab-reconstruct-ema`."""

from difflab.reconstruct_ema import main

if __name__ == "__main__":
    main()
