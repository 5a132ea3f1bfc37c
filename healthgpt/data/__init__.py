"""Training data: the LLaVA-style file format, converters from public datasets, the bundled
sample set made from real images in PyPI wheels, VQ-id caching, the dataset and the collator."""

from healthgpt.data.format import DataError, LoadReport, Sample, load_samples, read_rows, write_rows

__all__ = ["DataError", "LoadReport", "Sample", "load_samples", "read_rows", "write_rows"]
