"""runner: push thousands of files through a model on every accelerator a machine has."""
__version__ = "0.1.0"
