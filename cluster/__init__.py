"""Control plane and entry points of moe-serve (deployment, supervisor, CLI)."""

from cluster.config import ServiceConfig, load_config
from cluster.deploy import NAMESPACE, Deployment, deploy

__all__ = ["NAMESPACE", "Deployment", "ServiceConfig", "deploy", "load_config"]
