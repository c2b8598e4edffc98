"""The name the interpreter-start hook of ``robust-sparse doctor --fix`` imported before the adapter moved to
robust_sparse/environment/autoattack_alias.py: a venv fixed then still carries that ``.pth`` line, and a
missing module there would print an error at every Python start. ``doctor --fix`` now writes the new name."""

from robust_sparse.environment.autoattack_alias import install  # noqa: F401
