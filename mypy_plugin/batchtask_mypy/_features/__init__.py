"""One module per thing the plugin checks or types (see the package docstring)."""
