"""Evaluation library (no Ray): feature-space metrics of mapped vs target feature maps, classifier
agreement from a backbone's own head, linear-map analysis (weight vs bias, SVD) and report plots."""
