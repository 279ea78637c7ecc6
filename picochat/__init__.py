"""picochat: train a small ChatGPT-style model from scratch and serve it, on hardware you own."""

import os

# Apple-silicon Macs: an operator PyTorch has no MPS kernel for runs on the CPU (with a warning that
# names it) instead of stopping the run. PyTorch reads this once, when it is first imported.
os.environ.setdefault("PYTORCH_ENABLE_MPS_FALLBACK", "1")

__version__ = "0.1.0"
