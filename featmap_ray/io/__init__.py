"""Storage access: Lance tables, files under the storage root, image decoding, MLflow."""
