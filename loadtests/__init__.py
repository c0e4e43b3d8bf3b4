"""Load tests for the diffusion-accel HTTP server: Locust scenarios (`locustfile.py`) and a headless runner with
reports (`python -m loadtests --help`), and an overload, soak and video-cancel run (`python -m loadtests.overload
--help`). Speaks HTTP only: imports neither `server` nor `accel`."""
