"""Fault injection for issue 13: a pre-warmed fork server, worker bodies, scenarios, figures.

``tests/test_faults.py`` runs the bounded suite; ``RESUME_SOAK=N`` multiplies its runs
and durations by N. See docs/reliability.md for the figures it prints.
"""
