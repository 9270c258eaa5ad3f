"""`python prepare_clips.py ...` in a checkout runs `difflab.prepare_clips`, the same as the console command
`difflab-prepare-clips`."""

from difflab.prepare_clips import main

if __name__ == "__main__":
    main()
