"""Running one version: shared preprocessing, ONNX Runtime, the answer-or-abstain decision, the
in-domain score, calibration and trust fitted at export, and the API key file."""
