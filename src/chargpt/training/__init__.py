"""Training: the loop, optimizers and schedules, DDP, metrics and plots, the output folder, fine-tuning, sizing."""
