"""tuneserve: fine-tune, export, serve and score transfer-learned image classifiers."""
__version__ = "0.1.0"
