#!/usr/bin/env bash
# Starts the local control plane (the test environment) and keeps it running until Ctrl-C,
# printing how to point kubectl and helm at it.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$root"
bin=$(bash tests/env/build.sh)
state=$root/target/local-env
bash tests/env/stop.sh "$state" 2>/dev/null || true
rm -rf "$state"
trap 'bash tests/env/stop.sh "$state"' EXIT
bash tests/env/start.sh "$state" "$bin"
# shellcheck disable=SC1091
source "$state/env"
cat <<MSG

The local control plane is running (Kubernetes $("$bin/kubectl" version --client -o json | sed -n 's/.*"gitVersion": "\(.*\)".*/\1/p' | head -1), one kwok node).
In another shell:

  export PATH="$bin:\$PATH"
  export KUBECONFIG="$DISTR_TESTENV_KUBECONFIG"
  export SSL_CERT_FILE="$DISTR_TESTENV_CA"   # the registry's certificate comes from this CA
  kubectl get nodes
  helm registry login $DISTR_TESTENV_REGISTRY -u $DISTR_TESTENV_REGISTRY_USER -p $DISTR_TESTENV_REGISTRY_PASSWORD
  helm ls -A

OCI registry: oci://$DISTR_TESTENV_REGISTRY (TLS, htpasswd). Logs: $state/logs/
Press Ctrl-C to stop everything.
MSG
while sleep 3600; do :; done
