"""The embedded demo: a small synthetic aligned world and the whole workflow on one CPU machine."""
