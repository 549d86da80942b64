"""Session-wide fixtures. Real services (redis-server, Ray) are started by the plugins below."""

pytest_plugins = [
    "tests.plugins.redis_server", "tests.plugins.checkpoints", "tests.plugins.ray_runtime", "tests.plugins.serve_app",
]
