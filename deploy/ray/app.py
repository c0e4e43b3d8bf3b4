"""Ray Serve application running the same engine as `accel-server`: the server's FastAPI app (routes, scheduler,
batching, metrics) is the ingress of a Serve deployment, one replica per GPU, autoscaled on ongoing requests.

    serve run deploy.ray.app:app                         # settings from ACCEL_* variables, like `accel-server`
    RAY_ACCEL_NUM_GPUS=0 serve run deploy.ray.app:app    # CPU (tests): the embedded tiny model

Environment: RAY_ACCEL_NUM_GPUS (default 1), RAY_ACCEL_MIN_REPLICAS / RAY_ACCEL_MAX_REPLICAS (1 / 4),
RAY_ACCEL_TARGET_ONGOING (target ongoing requests per replica, default: ACCEL_MAX_BATCH_SIZE or 4),
ACCEL_CONFIG (a settings file).
"""

from __future__ import annotations

import os

from ray import serve

from server.app import create_app
from server.settings import load_settings


def _build_app():
    """Called in each replica: its own settings, engine and scheduler (the app's lifespan loads the models)."""
    return create_app(load_settings(os.environ.get("ACCEL_CONFIG") or None))


_target = float(os.environ.get("RAY_ACCEL_TARGET_ONGOING") or os.environ.get("ACCEL_MAX_BATCH_SIZE") or 4)


@serve.deployment(
    ray_actor_options={"num_gpus": float(os.environ.get("RAY_ACCEL_NUM_GPUS", "1"))},
    autoscaling_config={
        "min_replicas": int(os.environ.get("RAY_ACCEL_MIN_REPLICAS", "1")),
        "max_replicas": int(os.environ.get("RAY_ACCEL_MAX_REPLICAS", "4")),
        "target_ongoing_requests": _target,
    },
    max_ongoing_requests=int(os.environ.get("RAY_ACCEL_MAX_ONGOING", "64")),
    health_check_period_s=10,
    graceful_shutdown_timeout_s=float(os.environ.get("ACCEL_SHUTDOWN_GRACE_S", "30")),
)
@serve.ingress(_build_app)
class AccelServer:
    async def check_health(self) -> None:
        """Serve's health check: unhealthy if the models failed to load."""
        state = self.app.state.accel if hasattr(self, "app") else None
        if state is not None and state.load_error:
            raise RuntimeError(state.load_error)


app = AccelServer.bind()
