"""Container HEALTHCHECK: exit 0 when the server's /health answers 200 (stdlib only: no curl in the image).

    python deploy/healthcheck.py [URL]      # default http://127.0.0.1:$ACCEL_PORT/health (port 8000)
"""

import os
import sys
import urllib.request

url = sys.argv[1] if len(sys.argv) > 1 else f"http://127.0.0.1:{os.environ.get('ACCEL_PORT', '8000')}/health"
try:
    with urllib.request.urlopen(url, timeout=5) as response:
        sys.exit(0 if response.status == 200 else 1)
except Exception as exc:  # noqa: BLE001 - any failure is "unhealthy"
    print(f"unhealthy: {exc}", file=sys.stderr)
    sys.exit(1)
