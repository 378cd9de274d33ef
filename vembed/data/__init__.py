"""Data: record schema, readers, image decoding, preprocessing, collators and Ray Data pipelines."""
