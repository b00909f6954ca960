"""Ray Serve application: ``serve run serving/config.yaml``."""
