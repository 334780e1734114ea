"""Synthetic task families for experiments that need problems of known difficulty."""
