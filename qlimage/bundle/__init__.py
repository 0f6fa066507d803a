"""What each node receives: the rendered option kinds, the bundle document, preview and diff,
and its publishing below qlustar/nodes/; templates/ holds the node file templates."""
