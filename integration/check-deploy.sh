#!/usr/bin/env bash
# Checks the deploy files without a cluster, Docker or Prometheus:
#   - every Kubernetes manifest in deploy/kubernetes validates (strictly: no
#     unknown field) against the schemas of Kubernetes 1.30 and 1.37, with
#     kubernetes-validate, whose package ships the schemas (no download at
#     run time); the kustomization lists every manifest;
#   - the topology in the ConfigMap is one `omni` accepts;
#   - every PromQL expression of the alert rules and the Grafana dashboard
#     parses (promql-parser), names only omni_* and process_* metrics, and
#     the rules have what Alertmanager routes on (severity, summary).
# That each of those metrics exists in a real /metrics scrape is checked by
# tests/e2e/deploy_files.rs, which needs the services.
#
# The two Python packages are pinned and installed once into a virtualenv
# under ~/.cache/omni (OMNI_CACHE_DIR); later runs take well under a second.
set -euo pipefail
cd "$(dirname "$0")/.."

cache="${OMNI_CACHE_DIR:-$HOME/.cache/omni}"
packages=(kubernetes-validate==1.37.0 promql-parser==0.11.0)
venv="$cache/deploy-check-$(echo "${packages[*]}" | cksum | cut -d' ' -f1)"
# A venv cannot be moved (its scripts name their path), so a marker says the install finished.
if [ ! -e "$venv/.installed" ]; then
  if ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
    # Debian splits venv support out of python3.
    sudo_cmd=""
    [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
    echo "check-deploy: apt-get install python3-venv" >&2
    $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    $sudo_cmd env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  fi
  echo "check-deploy: installing ${packages[*]} into $venv" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "${packages[@]}"
  touch "$venv/.installed"
fi

manifests=()
for file in deploy/kubernetes/*.yaml; do
  [ "$(basename "$file")" = kustomization.yaml ] || manifests+=("$file")
done
for version in 1.30.0 1.37.0; do
  "$venv/bin/kubernetes-validate" --strict --quiet -k "$version" "${manifests[@]}"
done

omni="${OMNI_BIN:-target/release/omni}"
[ -x "$omni" ] || { echo "check-deploy: $omni is not built (cargo build --release --bins)" >&2; exit 1; }
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT

"$venv/bin/python" - "$scratch" <<'PY'
import json, pathlib, sys
import promql_parser, yaml

scratch = pathlib.Path(sys.argv[1])
failures = []

kustomization = yaml.safe_load(open("deploy/kubernetes/kustomization.yaml"))
listed = set(kustomization["resources"])
present = {p.name for p in pathlib.Path("deploy/kubernetes").glob("*.yaml")} - {"kustomization.yaml"}
if listed != present:
    failures.append(f"kustomization.yaml lists {sorted(listed)}, the folder has {sorted(present)}")

configmap = yaml.safe_load(open("deploy/kubernetes/configmap.yaml"))
(scratch / "topology.toml").write_text(configmap["data"]["room-state.toml"])

def metric_names(where, expr):
    try:
        tree = promql_parser.parse(expr)
    except ValueError as e:
        failures.append(f"{where}: PromQL does not parse ({e}): {expr}")
        return
    names = []
    promql_parser.walk(tree, pre_visit=lambda n: names.append(n.name) if isinstance(n, promql_parser.VectorSelector) else None)
    for name in names:
        if not (name or "").startswith(("omni_", "process_")):
            failures.append(f"{where}: {name!r} is not one of omni's metrics: {expr}")

rules = yaml.safe_load(open("deploy/prometheus/alerts.yaml"))
alerts = [r for g in rules["groups"] for r in g["rules"]]
for rule in alerts:
    where = f"alerts.yaml {rule.get('alert')}"
    metric_names(where, rule["expr"])
    if rule.get("labels", {}).get("severity") not in ("warning", "critical"):
        failures.append(f"{where}: no severity label (warning or critical)")
    if not rule.get("annotations", {}).get("summary"):
        failures.append(f"{where}: no summary annotation")
    if "for" in rule:
        promql_parser.parse_duration(rule["for"])

dashboard = json.load(open("deploy/grafana/omni.json"))
# Grafana's variables, as Grafana substitutes them before Prometheus sees the query.
variables = {"$__rate_interval": "1m", "$instance": ".*"}
targets = 0
for panel in dashboard["panels"]:
    for target in panel.get("targets", []):
        expr = target["expr"]
        for variable, value in variables.items():
            expr = expr.replace(variable, value)
        metric_names(f"omni.json panel {panel['title']!r}", expr)
        targets += 1

if failures:
    print("check-deploy:\n  " + "\n  ".join(failures), file=sys.stderr)
    sys.exit(1)
print(f"check-deploy: {len(present)} manifests valid; {len(alerts)} alert rules and {targets} dashboard queries parse")
PY

# The ConfigMap's topology passes the same validation as `omni run`'s.
env -u OMNI_BROKERS -u OMNI_REDIS_URL -u OMNI_STATE_DIR -u OMNI_HTTP_LISTEN -u OMNI_INSTANCE_ID \
  "$omni" run --print-config --topology "$scratch/topology.toml" >/dev/null
echo "check-deploy: the ConfigMap's topology is valid" >&2
