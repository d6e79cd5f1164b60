"""Training tasks other than WikiText language modelling (selected with --task)."""
