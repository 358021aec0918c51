"""cnnlab: convolutional-network image-classification experiments, fast and reproducible."""

__version__ = "0.1.0"
