"""Governing before running: static analysis of a workflow and its policy together.

`check` finds properties over every path (`tether check`), `diff` the change in autonomy
surface between two versions (`tether diff`), `graph` draws the workflow (`tether graph`).
Each reads definitions (and, for `diff --journal` and `graph --run`, a journal) only.
"""
