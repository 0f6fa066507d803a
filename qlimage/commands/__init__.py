"""One module per `qlimage` verb: argparse wiring and printing only; the logic lives in the package."""
