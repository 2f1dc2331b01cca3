"""The production loop: feedback, capture, review, drift and rollouts (torch-free; no HTTP here)."""
