"""Tasks that ship with the package (no downloads): the embedded synthetic arithmetic task."""
