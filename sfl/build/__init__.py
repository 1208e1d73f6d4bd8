"""Build: what ships to devices (the edge client's artifact) and how (Greengrass recipes)."""
