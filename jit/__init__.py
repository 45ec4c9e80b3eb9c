"""jit-aimc: the JiT diffusion transformer on simulated analog in-memory-computing hardware."""

__version__ = "0.1.0"
