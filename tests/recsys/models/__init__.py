"""Tests of recsys.models (baselines and rankers)."""
