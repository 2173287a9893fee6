"""Shared helpers for hastore's resource agents (agents/*): the OCF 1.1 contract in one place."""
