"""Files: model checkpoints and the resumable state, atomic writes and safe reads."""
