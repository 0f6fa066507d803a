"""Module packages: the Debian archive client, recipes, .deb packing, version resolution, the apt hook."""
