#!/usr/bin/env bash
# Starts the local control plane on loopback: etcd, kube-apiserver (RBAC enforced),
# kube-controller-manager, kube-scheduler, kwok with one Ready node, metrics-server behind the
# aggregation layer, and an OCI registry with TLS (certificate from the environment's CA) and
# htpasswd authentication. Writes "$state/env" (KEY=value lines for the harness) and returns once
# everything is ready. Stop it with tests/env/stop.sh "$state".
#
# kwok plays the node's kubelet: kube-apiserver reaches it at the node's InternalIP (127.0.0.1)
# and kubelet port (kwok's server address) for pods/log, and metrics-server scrapes it there.
# - Pod logs: kwok serves a container's log from a file named by a Logs (per pod) or
#   ClusterLogs (by namespace/name) object, which tests create (CRDs applied below). The file is
#   in the CRI log format and is re-read on every request. See tests/src/kwok.rs.
# - Metrics: tests/env/kwok-metrics.yaml; kwok-node-0 reports the constant usage below.
#
# The real node (tests/env/node.sh): with DISTR_TESTENV_REAL_NODE=1 (tests/run.sh sets it), a
# kubelet with containerd, kube-proxy, CoreDNS and a NetworkPolicy engine join the cluster as
# node distr-node-0, beside the kwok node, and kube-apiserver and the registry listen on the
# bridge's address (DISTR_TESTENV_HOST_IP), which pods reach, instead of 127.0.0.1.
# DISTR_TESTENV_NODE_IMAGES: OCI archives (space-separated) imported into its containerd.
#
# Opt-ins for the benchmark (bench/run.sh); unset, nothing changes:
# - DISTR_TESTENV_AUDIT=1: kube-apiserver writes an audit log, one JSON event per line, to
#   $state/logs/audit.log (Metadata level; node leases, health probes and the API server's own
#   loopback requests left out; no RequestReceived stage, so a request is one ResponseComplete
#   event, and a watch also one ResponseStarted event when it opens).
# - DISTR_TESTENV_KUBE_API_QPS=<n>: kube-controller-manager and kube-scheduler may make n
#   requests per second (burst 2n) instead of their defaults (20 and 50), so that the control
#   plane, not its client rate limits, sets the pace of large installs.
#
# usage: start.sh <state-dir> <bin-dir>
set -euo pipefail

state=${1:?usage: start.sh <state-dir> <bin-dir>}
bin=${2:?usage: start.sh <state-dir> <bin-dir>}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=$(cd "$bin/.." && pwd)
# shellcheck source=node.sh
source "$here/node.sh"

mkdir -p "$state"/{pki,logs,registry,kwok-logs,metrics-server}
state=$(cd "$state" && pwd)
: >"$state/pids"

log() { printf '[testenv] %s\n' "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# run <name> <command...>: starts a process in the background, logging to logs/<name>.log.
run() {
  local name=$1
  shift
  "$@" >"$state/logs/$name.log" 2>&1 &
  echo "$! $name" >>"$state/pids"
}

# wait_until <what> <seconds> <command...>
wait_until() {
  local what=$1 seconds=$2
  shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ $SECONDS -ge $deadline ]; then
      log "$what did not become ready within ${seconds}s; last log lines:"
      tail -n 30 "$state/logs/"*.log >&2 || true
      exit 1
    fi
    sleep 0.5
  done
}

pki=$state/pki
# A CA, the API server's serving certificate, and the ServiceAccount signing key.
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=distr-testenv-ca" \
  -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
  -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,IP:10.0.0.1,IP:%s,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc\nextendedKeyUsage=serverAuth\n' "$node_host_ip" >"$pki/apiserver.ext"
openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
  -days 2 -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=registry" \
  -keyout "$pki/registry.key" -out "$pki/registry.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1,IP:%s,DNS:localhost\nextendedKeyUsage=serverAuth\n' "$node_host_ip" >"$pki/registry.ext"
openssl x509 -req -in "$pki/registry.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
  -days 2 -extfile "$pki/registry.ext" -out "$pki/registry.crt" 2>/dev/null
# Serving certificates for kwok (the "kubelet") and metrics-server, checked by kube-apiserver and
# metrics-server against the CA. EC keys: they are made in milliseconds.
# ec_cert <name> <CN> <subjectAltName> <extendedKeyUsage> [<ca name>]
ec_cert() {
  local ca=${5:-ca}
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=$2" \
    -keyout "$pki/$1.key" -out "$pki/$1.csr" 2>/dev/null
  printf '%s\nextendedKeyUsage=%s\n' "$3" "$4" >"$pki/$1.ext"
  openssl x509 -req -in "$pki/$1.csr" -CA "$pki/$ca.crt" -CAkey "$pki/$ca.key" -CAcreateserial \
    -days 2 -extfile "$pki/$1.ext" -out "$pki/$1.crt" 2>/dev/null
}
ec_cert kwok kwok-node-0 subjectAltName=IP:127.0.0.1,DNS:kwok-node-0 serverAuth
ec_cert metrics-server metrics-server \
  subjectAltName=IP:127.0.0.1,DNS:metrics-server.kube-system.svc serverAuth
# The aggregation layer's own CA: kube-apiserver proxies to metrics-server with a client
# certificate of it, and metrics-server trusts the user named in the request headers only then.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
  -subj "/CN=distr-testenv-front-proxy-ca" -keyout "$pki/front-proxy-ca.key" -out "$pki/front-proxy-ca.crt" 2>/dev/null
ec_cert front-proxy-client front-proxy-client subjectAltName=DNS:front-proxy-client clientAuth front-proxy-ca
node_certs
openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
admin_token=$(openssl rand -hex 24)
# The admin token is for the harness only; processes under test get ServiceAccount tokens.
echo "$admin_token,distr-testenv-admin,distr-testenv-admin,system:masters" >"$pki/tokens.csv"
chmod 600 "$pki"/*

etcd_port=$(free_port)
etcd_peer_port=$(free_port)
api_port=$(free_port)
kcm_port=$(free_port)
sched_port=$(free_port)
kwok_port=$(free_port)
metrics_port=$(free_port)
registry_port=$(free_port)
kubelet_port=$(free_port)
kubelet_healthz_port=$(free_port)

# Where the API server and the registry listen: the real node's bridge when it runs (pods
# reach the host there; so does the host), loopback otherwise.
host_ip=127.0.0.1
real_node=
if node_wanted; then
  node_network
  host_ip=$node_host_ip
  real_node=$node_name
fi

etcd_data=$state/etcd
[ -d /dev/shm ] && etcd_data=$(mktemp -d /dev/shm/distr-testenv-etcd.XXXXXX)
echo "$etcd_data" >"$state/etcd-data-dir"

log "starting etcd on 127.0.0.1:$etcd_port"
run etcd "$bin/etcd" --name testenv --data-dir "$etcd_data" --unsafe-no-fsync \
  --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
  --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
  --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
  --initial-cluster "testenv=http://127.0.0.1:$etcd_peer_port" --log-level warn
wait_until etcd 30 curl -fsS "http://127.0.0.1:$etcd_port/readyz"

audit_flags=()
if [ "${DISTR_TESTENV_AUDIT:-}" = 1 ]; then
  cat >"$state/audit-policy.yaml" <<'POLICY'
apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
  - level: None
    users: [system:apiserver]
  - level: None
    resources: [{group: coordination.k8s.io, resources: [leases]}]
    namespaces: [kube-node-lease]
  - level: None
    nonResourceURLs: [/healthz*, /livez*, /readyz*]
  - level: Metadata
POLICY
  audit_flags=(--audit-policy-file "$state/audit-policy.yaml" --audit-log-path "$state/logs/audit.log"
    --audit-log-format json --audit-log-maxsize 100000)
  log "kube-apiserver audit log: $state/logs/audit.log"
fi
client_qps_flags=()
if [ -n "${DISTR_TESTENV_KUBE_API_QPS:-}" ]; then
  client_qps_flags=(--kube-api-qps "$DISTR_TESTENV_KUBE_API_QPS" --kube-api-burst "$((2 * DISTR_TESTENV_KUBE_API_QPS))")
fi

log "starting kube-apiserver on https://$host_ip:$api_port"
run kube-apiserver "$bin/kube-apiserver" "${audit_flags[@]}" \
  --etcd-servers "http://127.0.0.1:$etcd_port" \
  --bind-address "$host_ip" --advertise-address "$host_ip" --secure-port "$api_port" \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" --token-auth-file "$pki/tokens.csv" \
  --service-account-issuer https://kubernetes.default.svc \
  --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
  --service-cluster-ip-range 10.0.0.0/24 --authorization-mode Node,RBAC \
  --enable-admission-plugins NodeRestriction,PodNodeSelector,PodTolerationRestriction \
  --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
  --endpoint-reconciler-type none --enable-priority-and-fairness=false --allow-privileged=true \
  --kubelet-preferred-address-types InternalIP --kubelet-certificate-authority "$pki/ca.crt" \
  --requestheader-client-ca-file "$pki/front-proxy-ca.crt" --requestheader-allowed-names front-proxy-client \
  --requestheader-username-headers X-Remote-User --requestheader-group-headers X-Remote-Group \
  --requestheader-extra-headers-prefix X-Remote-Extra- \
  --proxy-client-cert-file "$pki/front-proxy-client.crt" --proxy-client-key-file "$pki/front-proxy-client.key"
api="https://$host_ip:$api_port"
wait_until kube-apiserver 90 curl -fsS --cacert "$pki/ca.crt" -H "Authorization: Bearer $admin_token" "$api/readyz"

kubeconfig=$state/admin.kubeconfig
cat >"$kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: testenv
  cluster:
    server: $api
    certificate-authority: $pki/ca.crt
users:
- name: admin
  user:
    token: $admin_token
contexts:
- name: testenv
  context: {cluster: testenv, user: admin}
current-context: testenv
KUBECONFIG
chmod 600 "$kubeconfig"

kubectl() { "$bin/kubectl" --kubeconfig "$kubeconfig" "$@"; }
# kwok watches Logs and ClusterLogs objects (--enable-crds); its informers need the CRDs first.
kubectl apply -f "$cache/kwok/crds.yaml" >/dev/null

always_allow=/healthz,/readyz,/livez,/metrics
log "starting kube-controller-manager, kube-scheduler, kwok (kubelet on 127.0.0.1:$kwok_port) and metrics-server"
run kube-controller-manager "$bin/kube-controller-manager" --kubeconfig "$kubeconfig" "${client_qps_flags[@]}" \
  --authentication-kubeconfig "$kubeconfig" --authorization-kubeconfig "$kubeconfig" \
  --leader-elect=false --bind-address 127.0.0.1 --secure-port "$kcm_port" \
  --root-ca-file "$pki/ca.crt" --service-account-private-key-file "$pki/sa.key" \
  --use-service-account-credentials=true --authorization-always-allow-paths "$always_allow"
run kube-scheduler "$bin/kube-scheduler" --kubeconfig "$kubeconfig" "${client_qps_flags[@]}" \
  --authentication-kubeconfig "$kubeconfig" --authorization-kubeconfig "$kubeconfig" \
  --leader-elect=false --bind-address 127.0.0.1 --secure-port "$sched_port" \
  --authorization-always-allow-paths "$always_allow"
# --node-ip and --node-port make kwok's node-initialize stage publish 127.0.0.1 as the node's
# InternalIP and kwok's port as its kubelet port, where kube-apiserver asks for logs.
wait_until "kwok CRDs" 30 kubectl wait --for condition=Established --timeout=2s \
  crd/logs.kwok.x-k8s.io crd/clusterlogs.kwok.x-k8s.io
run kwok "$bin/kwok" --kubeconfig "$kubeconfig" \
  --config "$cache/kwok/stages.yaml" --config "$here/kwok-metrics.yaml" --enable-crds Logs,ClusterLogs \
  --manage-all-nodes=false --manage-nodes-with-label-selector type=kwok --cidr 10.244.0.0/16 --server-address "127.0.0.1:$kwok_port" \
  --node-ip 127.0.0.1 --node-port "$kwok_port" \
  --tls-cert-file "$pki/kwok.crt" --tls-private-key-file "$pki/kwok.key" \
  --node-lease-duration-seconds 40
# metrics-server scrapes every node's kubelet port (kwok) every 10 s, its minimum; a figure needs
# two scrapes, so the first NodeMetrics appear 10-20 s after the node.
run metrics-server "$bin/metrics-server" --kubeconfig "$kubeconfig" \
  --authentication-kubeconfig "$kubeconfig" --authorization-kubeconfig "$kubeconfig" \
  --bind-address 127.0.0.1 --secure-port "$metrics_port" --cert-dir "$state/metrics-server" \
  --tls-cert-file "$pki/metrics-server.crt" --tls-private-key-file "$pki/metrics-server.key" \
  --kubelet-preferred-address-types InternalIP --kubelet-use-node-status-port \
  --kubelet-certificate-authority "$pki/ca.crt" --metric-resolution 10s --kubelet-request-timeout 5s \
  --authorization-always-allow-paths "$always_allow" --node-selector type=kwok

# The node's constant usage (see tests/env/kwok-metrics.yaml), also written to $state/env.
node_cpu_usage=1500m
node_memory_usage=3Gi
kubectl apply -f - >/dev/null <<NODE
apiVersion: v1
kind: Node
metadata:
  name: kwok-node-0
  annotations:
    metrics.k8s.io/resource-metrics-path: /metrics/nodes/kwok-node-0/metrics/resource
    kwok.x-k8s.io/usage-cpu: "$node_cpu_usage"
    kwok.x-k8s.io/usage-memory: "$node_memory_usage"
  labels:
    kubernetes.io/hostname: kwok-node-0
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    type: kwok
status:
  allocatable: {cpu: "32", memory: 256Gi, pods: "1000"}
  capacity: {cpu: "32", memory: 256Gi, pods: "1000"}
NODE

# metrics.k8s.io through the aggregation layer. There is no kube-proxy: an ExternalName Service
# names 127.0.0.1 and kube-apiserver dials it directly (an Endpoints or EndpointSlice address may
# not be a loopback address, so --enable-aggregator-routing cannot reach a host process).
# kube-apiserver checks metrics-server's certificate for metrics-server.kube-system.svc.
kubectl apply -f - >/dev/null <<METRICS
apiVersion: v1
kind: Service
metadata: {name: metrics-server, namespace: kube-system}
spec: {type: ExternalName, externalName: 127.0.0.1}
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: v1beta1.metrics.k8s.io}
spec:
  group: metrics.k8s.io
  version: v1beta1
  groupPriorityMinimum: 100
  versionPriority: 100
  service: {namespace: kube-system, name: metrics-server, port: $metrics_port}
  caBundle: $(base64 -w0 "$pki/ca.crt")
METRICS

wait_until "kwok node" 60 kubectl wait --for=condition=Ready node/kwok-node-0 --timeout=2s
wait_until "default ServiceAccount" 60 kubectl get serviceaccount default -n default

# Available once kube-apiserver has reached metrics-server (applied above, so that this overlaps
# with the waits before).
wait_until "metrics-server APIService" 60 kubectl wait --for condition=Available --timeout=2s \
  apiservice/v1beta1.metrics.k8s.io

log "starting the OCI registry on https://$host_ip:$registry_port"
registry_user=distr-test
registry_password=$(openssl rand -hex 16)
htpasswd -Bbn "$registry_user" "$registry_password" >"$state/registry/htpasswd" 2>/dev/null
cat >"$state/registry/config.yml" <<REGISTRY
version: 0.1
log: {level: warn}
storage:
  filesystem: {rootdirectory: $state/registry/data}
  delete: {enabled: true}
http:
  addr: $host_ip:$registry_port
  tls: {certificate: $pki/registry.crt, key: $pki/registry.key}
auth:
  htpasswd:
    realm: distr-testenv
    path: $state/registry/htpasswd
REGISTRY
run registry /usr/bin/docker-registry serve "$state/registry/config.yml"
wait_until registry 30 curl -sS --cacert "$pki/ca.crt" -o /dev/null "https://$host_ip:$registry_port/v2/"

if [ -n "$real_node" ]; then
  read -r -a node_extra_images <<<"${DISTR_TESTENV_NODE_IMAGES:-}"
  node_start
fi

cat >"$state/env" <<ENV
DISTR_TESTENV_STATE=$state
DISTR_TESTENV_BIN=$bin
DISTR_TESTENV_KUBECONFIG=$kubeconfig
DISTR_TESTENV_APISERVER=$api
DISTR_TESTENV_CA=$pki/ca.crt
DISTR_TESTENV_REGISTRY=$host_ip:$registry_port
DISTR_TESTENV_REGISTRY_USER=$registry_user
DISTR_TESTENV_REGISTRY_PASSWORD=$registry_password
DISTR_TESTENV_KWOK_LOGS_DIR=$state/kwok-logs
DISTR_TESTENV_NODE_CPU_USAGE=$node_cpu_usage
DISTR_TESTENV_NODE_MEMORY_USAGE=$node_memory_usage
DISTR_TESTENV_HOST_IP=$host_ip
DISTR_TESTENV_REAL_NODE=$real_node
DISTR_TESTENV_CONTAINERD_SOCKET=${real_node:+$state/node/containerd.sock}
ENV
log "control plane ready: $api (kubeconfig $kubeconfig), registry https://$host_ip:$registry_port${real_node:+, real node $real_node}"
