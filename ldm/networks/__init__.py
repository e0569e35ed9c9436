"""Plain ``nn.Module`` networks: no Lightning, no config dicts."""
