"""Reusable building blocks of the service, one Flask extension per feature."""
