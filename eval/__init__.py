"""Evaluation entry points of the repository (task pack under eval/tasks, runners, results table)."""
