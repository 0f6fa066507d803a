"""The doit task graph and the one function that takes the build lock and runs it."""
