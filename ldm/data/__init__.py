"""Data: webdataset shards in, batches ``{image, caption, class_label}`` out. Knows nothing of models."""
