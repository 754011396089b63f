"""Data stage: readers, intensity handling, de-identification, the store, splits, Dataset."""
