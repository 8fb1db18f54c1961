"""deploy/: the Prometheus config, recording and alerting rules (with their promtool unit tests) and the Grafana
dashboard are valid, and every lkserve metric they use is one the code exports or a recording rule of
deploy/prometheus. Drives the real `promtool` (Debian/Ubuntu package `prometheus`; `make test-tools`)."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool not found: install the `prometheus` package (apt-get install prometheus, or `make test-tools`)",
)

ROOT = Path(__file__).resolve().parents[1]
PROM = ROOT / "deploy" / "prometheus"
GRAFANA = ROOT / "deploy" / "grafana"
CONFIG = PROM / "prometheus.yml"
RECORDING = PROM / "recording_rules.yml"
ALERTS = PROM / "alert_rules.yml"
RULE_TESTS = sorted((PROM / "tests").glob("*.yml"))
DASHBOARD = GRAFANA / "dashboards" / "lkserve.json"
DATASOURCE_UID = "prometheus"


def promtool(*args: str) -> str:
    proc = subprocess.run([PROMTOOL, *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"promtool {' '.join(args)} failed:\n{out}"
    return out


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def rules(path: Path) -> list[dict]:
    return [r for g in load_yaml(path)["groups"] for r in g["rules"]]


# ----------------------------------------------------------------------------------- metric names in PromQL

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_COMMENT = re.compile(r"#[^\n]*")
_LKSERVE_NAME = re.compile(r"\blkserve[a-zA-Z0-9_:]*")
_GRAFANA_VARIABLE = re.compile(r"\$\{[^}]*\}|\$[A-Za-z_][A-Za-z0-9_]*")


def metric_names(expr: str) -> set[str]:
    """The lkserve metric / recording-rule names a PromQL expression (or series selector) uses. String literals
    (label values such as job="lkserve-worker") and comments are removed first; lkserve label names don't exist."""
    expr = _COMMENT.sub("", _STRING.sub('""', expr))
    return set(_LKSERVE_NAME.findall(expr))


def exported_names() -> set[str]:
    """Every series name the gateway's and the worker's code can expose, from prometheus_client's registry."""
    from prometheus_client import REGISTRY

    # importing a metrics module registers its metrics in prometheus_client's default REGISTRY
    serving = importlib.import_module("lkserve.metrics.serving")
    importlib.import_module("lkserve.metrics.worker")
    importlib.import_module("lkserve.capture.metrics")
    importlib.import_module("lkserve.gateway.spec_k")

    stats = serving.ENGINE_STATS
    saved = dict(vars(stats))
    # EngineStatsCollector yields nothing until a gateway fetched engine.info(): feed it one (engine out of
    # process, so the sink's counters are re-exported too), then put its state back for other tests.
    stats.update({"capture": {"enabled": True, "sample_rate": 1.0, "sink_dropped_by_reason": {"queue_full": 1}}},
                 engine_in_process=False)
    try:
        families = list(REGISTRY.collect())
    finally:
        vars(stats).clear()
        vars(stats).update(saved)
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
        "summary": ("", "_count", "_sum", "_created"),
        "info": ("_info",),
    }
    names = set()
    for fam in families:
        # a labelled family without children has no samples yet: derive its series names from its type
        names.update(fam.name + s for s in suffixes.get(fam.type, ("",)))
        names.update(s.name for s in fam.samples)
    return names


def recorded_names() -> set[str]:
    return {r["record"] for r in rules(RECORDING)}


def unknown_names(expr: str) -> set[str]:
    return metric_names(expr) - exported_names() - recorded_names()


# ----------------------------------------------------------------------------------- the dashboard's queries

def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def walk(node):
    """Every dict in a JSON tree: panels, nested panels of collapsed rows, targets, annotation queries."""
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from walk(v)


def dashboard_exprs() -> list[str]:
    return [d["expr"] for d in walk(dashboard()) if isinstance(d.get("expr"), str) and d["expr"].strip()]


def panels(nodes: list[dict]):
    for p in nodes:
        yield p
        yield from panels(p.get("panels", []))


def as_promql(expr: str) -> str:
    """Grafana's variables ($__rate_interval, $__interval, $__range, ${var}) become 5m, so promtool can parse."""
    return _GRAFANA_VARIABLE.sub("5m", expr)


# ----------------------------------------------------------------------------------- Prometheus

def test_prometheus_config_is_valid():
    out = promtool("check", "config", str(CONFIG))
    assert "SUCCESS: 2 rule files found" in out, out
    cfg = load_yaml(CONFIG)
    assert cfg["rule_files"] == ["recording_rules.yml", "alert_rules.yml"]  # relative: works under /etc/prometheus
    targets = {sc["job_name"]: [t for s in sc["static_configs"] for t in s["targets"]] for sc in cfg["scrape_configs"]}
    assert targets == {"lkserve-gateway": ["gateway:8000"], "lkserve-worker": ["worker:9100"]}


def test_rule_files_are_valid():
    promtool("check", "rules", str(RECORDING), str(ALERTS))
    for r in rules(RECORDING):
        assert r["record"].startswith("lkserve:"), r["record"]
    for r in rules(ALERTS):
        assert r["alert"].startswith("Lkserve"), r["alert"]
        assert "for" in r, f"{r['alert']} has no `for:`"
        assert r["labels"]["severity"] in {"critical", "warning", "info"}, r["alert"]
        assert r["annotations"].get("summary") and r["annotations"].get("description"), r["alert"]


def test_promtool_unit_tests_pass():
    assert RULE_TESTS, "no promtool unit tests under deploy/prometheus/tests"
    promtool("test", "rules", *map(str, RULE_TESTS))


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    fires, quiet = set(), set()
    for path in RULE_TESTS:
        for case in load_yaml(path).get("tests", []):
            for t in case.get("alert_rule_test", []):
                (fires if t.get("exp_alerts") else quiet).add(t["alertname"])
    alerts = {r["alert"] for r in rules(ALERTS)}
    assert {"LkserveAcceptanceCollapsedAfterSwap", "LkserveCaptureDropRateHigh", "LkserveWorkerStalled",
            "LkserveCaptureStreamLagGrowing"} <= alerts
    assert alerts - fires == set(), "alerts without a test case where they fire"
    assert alerts - quiet == set(), "alerts without a test case where they stay quiet"
    assert (fires | quiet) - alerts == set(), "tests of alerts that do not exist"


# ----------------------------------------------------------------------------------- Grafana

def test_dashboard_queries_parse(tmp_path):
    exprs = dashboard_exprs()
    assert len(exprs) >= 20
    rules_file = tmp_path / "dashboard_rules.yml"
    # one recording rule per query (distinct names: promtool lints duplicates)
    records = [{"record": f"dashboard:query_{i}", "expr": as_promql(e)} for i, e in enumerate(exprs)]
    rules_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": records}]}))
    out = promtool("check", "rules", str(rules_file))
    assert f"SUCCESS: {len(exprs)} rules found" in out, out


def test_dashboard_structure():
    dash = dashboard()
    assert dash["uid"] == "lkserve" and 36 <= dash["schemaVersion"] <= 41
    all_panels = list(panels(dash["panels"]))
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    assert any(p["type"] == "row" and p.get("collapsed") and p["panels"] for p in dash["panels"])
    for p in all_panels:
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == DATASOURCE_UID, p["title"]
        assert p["targets"] and all(t["expr"].strip() for t in p["targets"]), p["title"]
        assert all(t["datasource"]["uid"] == DATASOURCE_UID for t in p["targets"]), p["title"]
    queries = [a for a in dash["annotations"]["list"] if a.get("datasource", {}).get("uid") == DATASOURCE_UID]
    assert any("lkserve_draft_version_info" in a["expr"] or "lkserve_draft_swaps_total" in a["expr"] for a in queries)
    # the provisioned datasource is the one the dashboard names
    ds = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert [(d["name"], d["uid"], d["url"]) for d in ds] == [("Prometheus", DATASOURCE_UID, "http://prometheus:9090")]
    providers = load_yaml(GRAFANA / "provisioning" / "dashboards" / "lkserve.yml")["providers"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"


# ----------------------------------------------------------------------------------- names exist

def used_names() -> dict[str, set[str]]:
    """{where: names} for the rule files, their unit tests (input series and expressions) and the dashboard."""
    used = {}
    for path in (RECORDING, ALERTS):
        used[path.name] = set().union(*(metric_names(r["expr"]) for r in rules(path)))
    for path in RULE_TESTS:
        names = set()
        for case in load_yaml(path).get("tests", []):
            for s in case.get("input_series", []):
                names |= metric_names(s["series"])
            for t in case.get("promql_expr_test", []):
                names |= metric_names(t["expr"])
        used[f"tests/{path.name}"] = names
    used[DASHBOARD.name] = set().union(*(metric_names(e) for e in dashboard_exprs()))
    return used


def test_every_used_metric_is_exported_or_recorded():
    known = exported_names() | recorded_names()
    used = used_names()
    unknown = {where: sorted(names - known) for where, names in used.items() if names - known}
    assert unknown == {}, f"metric names neither exported by lkserve nor recorded in deploy/prometheus: {unknown}"


def test_the_name_check_is_real():
    used = set().union(*used_names().values())
    assert "lkserve_spec_accepted_tokens_total" in used
    assert "lkserve_capture_records_dropped_total" in used  # a family that has no series until its first drop
    assert "lkserve_capture_engine_dropped_total" in used  # only there once ENGINE_STATS was updated
    assert "lkserve:spec_acceptance_rate:rate5m" in used
    exported = exported_names()
    assert {"lkserve_spec_accepted_tokens_total", "lkserve_time_to_first_token_seconds_bucket",
            "lkserve_capture_records_written_total", "lkserve_capture_consumer_lag"} <= exported
    # a misspelt name, a misspelt recording rule and a `_total` on a gauge are caught; label values are not names
    assert unknown_names("sum(rate(lkserve_spec_acepted_tokens_total[5m]))") == {"lkserve_spec_acepted_tokens_total"}
    assert unknown_names("lkserve:spec_acceptance_rate:rate15m > 0") == {"lkserve:spec_acceptance_rate:rate15m"}
    assert unknown_names("lkserve_worker_loss_total") == {"lkserve_worker_loss_total"}
    assert unknown_names('up{job=~"lkserve-gateway|lkserve_x"} == 0  # lkserve_in_a_comment') == set()
