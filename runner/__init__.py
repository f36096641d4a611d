"""cardrunner: evaluate ImageNet classifiers on every chip of a card at once."""

__version__ = "0.1.0"
