"""The apps Flower's deployment engine loads by name (``medtl.federated.flower_apps:server_app``
and ``:client_app``, in the bundle medtl.federated.deploy submits). Importing this module
imports Flower: only Flower's processes do."""

from medtl.federated.apps import make_client_app, make_server_app

server_app = make_server_app()
client_app = make_client_app()
