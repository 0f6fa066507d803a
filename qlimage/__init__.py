"""qlimage: build Qlustar-style node OS images and everything a stateless node needs to boot."""

__version__ = "0.1.0"
