"""Serve entry point: ``serve run serving.app:build_app config_path=jobs/configs/smoke.yaml``.

Thin on purpose: the deployment lives in ``lensmill.serve``. Importing this module has no side
effects (no Ray, no Serve started). ``serving/config.yaml`` names ``lensmill.serve:build_app`` directly,
which works wherever lensmill is installed, without this file on the path.
"""

from lensmill.serve import build_app

__all__ = ["build_app"]
