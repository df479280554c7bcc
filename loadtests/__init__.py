"""Ponder loadtests (see DESIGN.md section 1)."""
