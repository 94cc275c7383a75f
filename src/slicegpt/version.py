"""The one place slicegpt's version is written (pyproject.toml reads it from here).

It moves with every release (CHANGELOG.md). Outputs and run directories record it, so a run
directory left by other code is recognised and not resumed.
"""

__version__ = "0.2.0"
