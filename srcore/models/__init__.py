"""Networks of the paper: SRResNet (SRGAN's generator), the discriminator, VGG19 features."""
