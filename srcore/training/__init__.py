"""What the two training stages share, one job per module: runtime (device, precision),
checkpoints, steps, validation, the loop, distributed training and the session around it."""
