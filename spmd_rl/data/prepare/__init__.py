"""Scripts that write datasets in verl's parquet schema (``python -m spmd_rl.data.prepare.<name>``)."""
