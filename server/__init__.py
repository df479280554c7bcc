"""Ponder server (see DESIGN.md section 1)."""
