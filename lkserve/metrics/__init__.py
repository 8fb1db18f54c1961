"""Prometheus metrics, one module per process kind: `serving` (gateway + engine) and `worker`. Every name is
`lkserve_*`; README.md lists them with their exact meaning."""
