"""Boot loaders, one module per loader, and their templates/."""
