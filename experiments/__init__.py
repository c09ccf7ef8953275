"""Study scripts (ablations, sweeps) and the Parquet analysis behind their reports."""
