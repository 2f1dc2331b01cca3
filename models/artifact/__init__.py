"""What an exported version is and where it lives: manifest and eval.json, the model stores, precision
variants (fp16, static INT8) and the drift reference written at export."""
