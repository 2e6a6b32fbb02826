"""The pipeline's stages: plain functions with typed inputs and outputs, no Prefect inside."""
