"""Deployable bundles of a trained run: a self-contained folder to predict without medtl."""
