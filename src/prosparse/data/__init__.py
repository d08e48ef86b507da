"""Text sources (embedded corpora, users' files) and packing into token blocks.

Its own package rather than ``training/data.py``: sparsity measurement, predictor collection and
training all read the same sources with the same deterministic split.
"""

from prosparse.data.packing import pack_blocks
from prosparse.data.sources import (
    DEFAULT_DATA,
    DataSpec,
    check_data,
    load_texts,
    parse_data_spec,
)

__all__ = ["DEFAULT_DATA", "DataSpec", "check_data", "load_texts", "pack_blocks",
           "parse_data_spec"]
