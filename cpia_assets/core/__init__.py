"""Functional core: plain Python modules with no Dagster import, testable on their own."""
