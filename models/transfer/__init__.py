"""Torch-free transfer tools: transferability scores, the advisor, instant heads on frozen embeddings
and the data-fitted recipe. They run in the CLI and in job children, never in a serving worker."""
