"""Developer tools: generated docs and setup helpers; not pipeline stages."""
