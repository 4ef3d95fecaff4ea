"""exl2.calibration: calibration datasets to token rows.

The embedded default mix lives in ``data/`` (sources, licences and hashes in ``data/MANIFEST.json``,
regenerated from the repository by ``python -m fixtures.build_calibration``); :mod:`exl2.calibration.rows`
turns it, or a user's parquet, jsonl or text file (read by :mod:`exl2.calibration.textrows`), into int64 token
rows with their provenance.
"""

from .rows import (CATEGORIES, MEASURE_WEIGHTS, QUANT_WEIGHTS, CalibrationError, CalibrationRows, allocate_rows,
                   default_rows, load_rows, user_rows)

__all__ = ["CATEGORIES", "MEASURE_WEIGHTS", "QUANT_WEIGHTS", "CalibrationError", "CalibrationRows",
           "allocate_rows", "default_rows", "load_rows", "user_rows"]
