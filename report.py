"""`python report.py ...` in a checkout runs `difflab.report`, the same as the console command `difflab-report`."""

from difflab.report import main

if __name__ == "__main__":
    main()
