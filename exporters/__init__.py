"""Ponder exporters (see DESIGN.md section 1)."""
