"""The end-to-end demo: a built-in preference task, both stages, before/after evaluation."""
