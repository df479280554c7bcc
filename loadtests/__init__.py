"""Ponder loadtests: a black-box load generator over HTTP (it imports nothing of ours) and its report."""
