"""Thin transports: validate, convert, call the core, convert back."""
