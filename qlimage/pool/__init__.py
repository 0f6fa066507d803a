"""Module packages: the Debian archive client, recipes, reproducible .deb packing, version
resolution against the pool, and the apt hook that feeds the pool."""
