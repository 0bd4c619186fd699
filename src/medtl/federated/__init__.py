"""Federated transfer learning on Flower: one model trained across sites, images never moved.

``federate`` (medtl.federated.job) runs the rounds in Flower's simulation engine and writes a
run; ``medtl.federated.deploy`` runs them across real sites (a SuperLink and one SuperNode per
hospital). What travels is decided in medtl.federated.shared, how a site trains in
medtl.federated.local, Flower's apps in medtl.federated.apps. Flower and Opacus are optional
(``pip install 'medtl[federated]'``) and imported only when a federation runs.
"""

from __future__ import annotations

from typing import Any

__all__ = ["federate"]


def federate(*args: Any, **kwargs: Any):
    """See medtl.federated.job.federate."""
    from medtl.federated.job import federate as run

    return run(*args, **kwargs)
