"""Container HEALTHCHECK for every lkserve image (stdlib only, no curl needed).

The role is read from the container's main command (/proc/1/cmdline), so one probe serves all images:
  `lkserve serve`  -> GET http://127.0.0.1:$LKSERVE_GATEWAY__PORT/health   (default 8000)
  `lkserve worker` -> GET http://127.0.0.1:$LKSERVE_TRAINER__METRICS_PORT/metrics   (default 9100)
Exit 0 = healthy, 1 = unhealthy. An explicit argument (`serve` or `worker`) overrides the detection.
"""

from __future__ import annotations

import os
import sys
import urllib.request


def role() -> str:
    if len(sys.argv) > 1:
        return sys.argv[1]
    try:
        with open("/proc/1/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        argv = []
    return "worker" if b"worker" in argv else "serve"


def main() -> int:
    if role() == "worker":
        url = f"http://127.0.0.1:{os.environ.get('LKSERVE_TRAINER__METRICS_PORT') or 9100}/metrics"
    else:
        url = f"http://127.0.0.1:{os.environ.get('LKSERVE_GATEWAY__PORT') or 8000}/health"
    try:
        with urllib.request.urlopen(url, timeout=4) as r:  # a fixed loopback URL
            return 0 if r.status == 200 else 1
    except Exception as e:  # noqa: BLE001 - any failure is "unhealthy"
        print(f"unhealthy: {url}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
