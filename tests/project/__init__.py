"""The repository itself: generated code and docs up to date, packaging, the README
examples, the breaking-change check."""
