"""The benchmark runs (smoke) and its durable floors behave."""
