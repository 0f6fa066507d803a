"""What each node receives: rendered option kinds, the bundle document, preview and diff; templates/."""
