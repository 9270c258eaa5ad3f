"""`python encode_latents.py ...` in a checkout runs `difflab.encode_latents`, the same as the console command `difflab-encode-latents`."""

from difflab.encode_latents import main

if __name__ == "__main__":
    main()
