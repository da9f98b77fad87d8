"""Configs inside the package: the defaults (`base`) and the embedded demo (`demo`)."""
