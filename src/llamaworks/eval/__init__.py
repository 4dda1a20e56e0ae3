"""Evaluation (paper section 3): the model interface, scoring rules, code execution, tasks."""
