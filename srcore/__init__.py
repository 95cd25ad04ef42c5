"""srgan-pipeline library: SRResNet/SRGAN training, evaluation and tracking, without Prefect."""

__version__ = "0.1.0"
