"""HTTP surfaces over the engine: thin handlers that decode, call the engine and encode."""
