"""`python -m hlb_gpt ...` (and `torchrun -m hlb_gpt ...`) is the same as `hlb-gpt ...`."""

from hlb_gpt.cli import main

if __name__ == "__main__":
    main()
