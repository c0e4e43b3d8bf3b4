"""Load tests for the diffusion-accel HTTP server: Locust scenarios (`locustfile.py`) and a headless runner with
reports (`python -m loadtests --help`). Speaks HTTP only: imports neither `server` nor `accel`."""
