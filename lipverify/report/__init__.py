"""Renderers: rich tables for people, JSON for machines, HTML/Markdown audit reports."""
