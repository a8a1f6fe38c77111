"""The old home of :func:`cellfit.synthetic.scene` (kept until its last importers,
tests/test_starting.py, tests/test_plugin_jobs.py and tests/test_plugin_widget.py,
import from :mod:`cellfit.synthetic`; then removed)."""

from cellfit.synthetic import KINDS, layout, scene

__all__ = ["KINDS", "layout", "scene"]
