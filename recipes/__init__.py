"""Training recipes that build this project's models (run from the repository root: `python -m recipes.<name>.<stage>`)."""
