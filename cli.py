"""`python cli.py ...` from a checkout behaves like the installed `hlb-gpt ...` command."""

from hlb_gpt.cli import main

if __name__ == "__main__":
    main()
