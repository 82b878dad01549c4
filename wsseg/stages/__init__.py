"""Pipeline stages: plain functions, paths and configs in, paths and metrics out."""
