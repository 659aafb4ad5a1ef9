"""The recipe that builds the default model, `checkpoints/editr2-shapes-tiny`: VAE, reasoner and editor stages, the
export, the results grid and the RL demonstration (README.md beside this file)."""
