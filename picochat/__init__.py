"""picochat: train a small ChatGPT-style model from scratch and serve it, on hardware you own."""

__version__ = "0.1.0"
