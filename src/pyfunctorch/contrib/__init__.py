"""Adapters that plug pyfunctorch into other libraries (imported on demand, never by ``import pyfunctorch``)."""
