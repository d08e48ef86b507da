"""The ground floor: errors, atomic file output and run-folder markers, argument checks, tables,
plots, where shipped assets live, and the one YAML + dotted-override config loader."""

__version__ = "0.1.0"
