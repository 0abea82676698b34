# The test environment's real node, sourced by start.sh and stop.sh: containerd (Debian's, with
# runc) with a root, state and socket of its own under $state/node, the CNI bridge plugin with
# host-local addresses on a bridge made here, a kubelet and a kube-proxy built at the control
# plane's Kubernetes version, and CoreDNS as a host process (no NetworkPolicy engine: see
# node_start). What was found on the way to a working node on this kind of machine (cgroup v1, no
# systemd, nothing to pull) is noted where it is handled.
#
# One real node per machine: kube-proxy's netfilter rules, the bridge and containerd's shim sockets (/run/containerd/s) are host-wide, so the node takes a
# lock and a second environment on the same machine runs without one (kwok only).
#
# The node never disturbs the kwok-based tests:
# - kwok manages only the nodes labelled type=kwok (not this one, whose pods are real);
# - the node is tainted distr.local/real-node=true:NoSchedule; a namespace whose pods belong
#   there carries the PodNodeSelector and PodTolerationRestriction annotations (see
#   node_namespace_annotations), so a manifest is applied unmodified;
# - metrics-server scrapes only the kwok node, whose usage is the constant the tests expect.
#
# Pods reach the host at the bridge's address ($node_host_ip): kube-apiserver and the OCI
# registry listen there (the `kubernetes` Service's EndpointSlice names it), CoreDNS answers
# there (the kubelet's clusterDNS), and the harness binds its Hub simulators there.

node_name=distr-node-0
node_bridge=distr-cni0
node_pod_cidr=10.88.0.0/16
node_host_ip=10.88.0.1
node_taint_key=distr.local/real-node
node_lock=/run/distr-testenv-real-node.lock
# The pod sandbox image build.sh makes (tests/env/pause); containerd's default,
# registry.k8s.io/pause, cannot be pulled here.
node_pause_image=distr.local/testenv/pause:1
# Debian's containernetworking-plugins
node_cni_bin=/usr/lib/cni

node_log() { printf '[testenv:node] %s\n' "$*" >&2; }

# node_wanted: true when this environment runs the real node (DISTR_TESTENV_REAL_NODE=1, which
# tests/run.sh sets) and no other environment on the machine runs one.
node_wanted() {
  [ "${DISTR_TESTENV_REAL_NODE:-0}" = 1 ] || return 1
  local holder
  if [ -f "$node_lock" ]; then
    holder=$(cat "$node_lock")
    if [ "$holder" != "$state" ] && [ -f "$holder/node/running" ]; then
      node_log "another environment ($holder) runs the real node on this machine; this one runs without"
      return 1
    fi
  fi
  echo "$state" >"$node_lock"
}

# node_network: the bridge pods attach to, with the host's address on it. Before
# kube-apiserver starts: it listens on that address.
node_network() {
  local t=$SECONDS
  mkdir -p "$state/node"
  touch "$state/node/running"
  if ! ip link show "$node_bridge" >/dev/null 2>&1; then
    ip link add "$node_bridge" type bridge
  fi
  ip addr replace "$node_host_ip/${node_pod_cidr#*/}" dev "$node_bridge"
  ip link set "$node_bridge" up
  # Pods' packets are routed between the bridge and the host's addresses, and bridged packets
  # pass through netfilter (kube-proxy's DNAT of Service addresses).
  sysctl -qw net.ipv4.ip_forward=1
  sysctl -qw net.bridge.bridge-nf-call-iptables=1
  node_log "bridge $node_bridge at $node_host_ip ($((SECONDS - t)) s)"
}

# node_certs: the kubelet's serving certificate (checked by kube-apiserver and metrics-server
# against the CA), its client certificate as the node (Node authorizer), and kube-apiserver's
# client certificate for the kubelet's API (logs, exec).
node_certs() {
  ec_cert kubelet "$node_name" "subjectAltName=IP:$node_host_ip,DNS:$node_name" serverAuth
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/O=system:nodes/CN=system:node:$node_name" \
    -keyout "$pki/kubelet-client.key" -out "$pki/kubelet-client.csr" 2>/dev/null
  printf 'extendedKeyUsage=clientAuth\n' >"$pki/kubelet-client.ext"
  openssl x509 -req -in "$pki/kubelet-client.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 2 -extfile "$pki/kubelet-client.ext" -out "$pki/kubelet-client.crt" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj "/O=system:masters/CN=kube-apiserver-kubelet-client" \
    -keyout "$pki/apiserver-kubelet-client.key" -out "$pki/apiserver-kubelet-client.csr" 2>/dev/null
  openssl x509 -req -in "$pki/apiserver-kubelet-client.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 2 -extfile "$pki/kubelet-client.ext" -out "$pki/apiserver-kubelet-client.crt" 2>/dev/null
  chmod 600 "$pki"/*
}

# node_images <archive...>: imports OCI archives into containerd's namespace for Kubernetes.
node_images() {
  local archive
  for archive in "$@"; do
    node_ctr images import "$archive" >/dev/null
  done
}

node_ctr() { ctr --address "$state/node/containerd.sock" -n k8s.io "$@"; }

# node_start: everything else, once the control plane and the registry run.
node_start() {
  local n="$state/node" t=$SECONDS step=$SECONDS
  timed() { node_log "$1 ($((SECONDS - step)) s)"; step=$SECONDS; }
  mkdir -p "$n"/{cni,ipam,kubelet,pod-logs,containerd}

  # containerd: its own root, state and socket; the CRI plugin's sandbox image is the pause
  # image build.sh made (registry.k8s.io cannot be reached), its CNI configuration ours.
  # Unused snapshotters are left out (they log errors for file systems not here).
  cat >"$n/containerd.toml" <<TOML
version = 2
root = "$n/containerd/root"
state = "$n/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.internal.v1.opt", "io.containerd.tracing.processor.v1.otlp"]
[grpc]
  address = "$n/containerd.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$node_pause_image"
  # Pods' network namespaces are pinned under the state dir, not /run/netns.
  netns_mounts_under_state_dir = true
  # Root here lacks CAP_SYS_RESOURCE (its capability mask has bit 24 clear), so runc cannot
  # lower a container's oom_score_adj (-998 for the sandbox: "failed to update
  # /proc/self/oom_score_adj: Permission denied", seen by containerd as "can't get final
  # child's PID from pipe: EOF"): keep each at or above containerd's own.
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "$node_cni_bin"
    conf_dir = "$n/cni"
TOML
  cat >"$n/cni/10-distr-testenv.conflist" <<CNI
{
  "cniVersion": "1.0.0",
  "name": "distr-testenv",
  "plugins": [{
    "type": "bridge", "bridge": "$node_bridge", "isGateway": true, "ipMasq": false, "hairpinMode": true,
    "ipam": {"type": "host-local", "dataDir": "$n/ipam",
      "ranges": [[{"subnet": "$node_pod_cidr", "gateway": "$node_host_ip"}]],
      "routes": [{"dst": "0.0.0.0/0"}]}
  }]
}
CNI
  run containerd containerd --config "$n/containerd.toml"
  wait_until containerd 30 ctr --address "$n/containerd.sock" version
  timed "containerd $(ctr --address "$n/containerd.sock" version | sed -n 's/^ *Version: *//p' | tail -1) started"
  node_images "$cache/node/pause.oci.tar" "${node_extra_images[@]}"
  timed "images imported"

  # The kubelet. cgroup v1 and no systemd here: failCgroupV1 false and the cgroupfs driver,
  # under a cgroup root of its own (stop.sh removes it). Swap may be on. Its ports are its own
  # (kwok serves the kwok node's). clusterDNS is CoreDNS on the bridge. A short syncFrequency
  # delivers updated Secrets to mounted volumes within seconds (certificate rotation tests).
  cat >"$n/kubelet.yaml" <<KUBELET
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: /distr-testenv
containerRuntimeEndpoint: unix://$n/containerd.sock
address: $node_host_ip
port: $kubelet_port
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: $kubelet_healthz_port
failSwapOn: false
podLogsDir: $n/pod-logs
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
tlsCertFile: $pki/kubelet.crt
tlsPrivateKeyFile: $pki/kubelet.key
clusterDNS: [$node_host_ip]
clusterDomain: cluster.local
resolvConf: $n/resolv.conf
syncFrequency: 10s
serializeImagePulls: false
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%, nodefs.inodesFree: 1%}
imageGCHighThresholdPercent: 100
registerWithTaints:
  - {key: $node_taint_key, value: "true", effect: NoSchedule}
KUBELET
  # Pods resolve cluster names only (nothing outside is reachable from here).
  : >"$n/resolv.conf"
  cat >"$n/kubelet.kubeconfig" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: testenv
  cluster: {server: $api, certificate-authority: $pki/ca.crt}
users:
- name: node
  user: {client-certificate: $pki/kubelet-client.crt, client-key: $pki/kubelet-client.key}
contexts:
- name: testenv
  context: {cluster: testenv, user: node}
current-context: testenv
KUBECONFIG
  # The cgroup root must exist in each hierarchy; a cpuset cgroup needs its CPUs and memory
  # nodes before anything can run in it.
  local h
  for h in /sys/fs/cgroup/*/; do
    mkdir -p "$h/distr-testenv"
  done
  cat /sys/fs/cgroup/cpuset/cpuset.cpus >/sys/fs/cgroup/cpuset/distr-testenv/cpuset.cpus
  cat /sys/fs/cgroup/cpuset/cpuset.mems >/sys/fs/cgroup/cpuset/distr-testenv/cpuset.mems
  run kubelet "$bin/kubelet" --config "$n/kubelet.yaml" --kubeconfig "$n/kubelet.kubeconfig" \
    --root-dir "$n/kubelet" --cert-dir "$n/kubelet/pki" --hostname-override "$node_name" \
    --node-ip "$node_host_ip" --node-labels "type=real,kubernetes.io/hostname=$node_name"

  # kube-proxy (iptables mode, through Debian's iptables on nf_tables): Service addresses,
  # among them the `kubernetes` Service, whose endpoint is kube-apiserver on the bridge.
  run kube-proxy "$bin/kube-proxy" --kubeconfig "$kubeconfig" --hostname-override "$node_name" \
    --proxy-mode iptables --cluster-cidr "$node_pod_cidr" --conntrack-max-per-core 0 \
    --metrics-bind-address "127.0.0.1:$(free_port)" --healthz-bind-address "127.0.0.1:$(free_port)"
  kubectl apply -f - >/dev/null <<SLICE
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: kubernetes-testenv
  namespace: default
  labels:
    kubernetes.io/service-name: kubernetes
    endpointslice.kubernetes.io/managed-by: distr-testenv
addressType: IPv4
endpoints:
  - addresses: ["$node_host_ip"]
    conditions: {ready: true}
ports:
  - {name: https, port: $api_port, protocol: TCP}
SLICE

  # CoreDNS on the bridge: Service and pod names of cluster.local, nothing else.
  cat >"$n/Corefile" <<COREFILE
cluster.local:53 in-addr.arpa:53 {
    bind $node_host_ip
    errors
    kubernetes cluster.local in-addr.arpa {
        kubeconfig $kubeconfig testenv
        pods insecure
    }
    cache 5
}
COREFILE
  run coredns "$bin/coredns" -conf "$n/Corefile"

  # No NetworkPolicy engine runs: kube-network-policies (v0.8.0, nftables rules that send new
  # connections to an nfqueue) was built and tried, and this kernel has no nftables `queue`
  # expression (nft_queue is not built in and nothing can be loaded): its first rule fails
  # with "Could not process rule: No such file or directory" (`nft add rule ... queue num 100
  # bypass`), so it enforces nothing. An engine on iptables and ipset (kube-router's) is the
  # candidate; tests/tests/real_node/network_policy.rs waits for one.

  wait_until "node $node_name Ready" 120 kubectl wait --for=condition=Ready "node/$node_name" --timeout=2s
  timed "kubelet, kube-proxy, CoreDNS started; node $node_name Ready"
  node_log "real node ready in $((SECONDS - t)) s"
}

# node_stop: stops what node_start started (the pid file's processes are stopped by the
# caller first: kubelet, kube-proxy, CoreDNS, containerd), then removes
# what they leave on the host, and says whether anything is left.
node_stop() {
  local n="$state/node" left=()
  [ -d "$n" ] || return 0
  # Containers: the kubelet and containerd are gone; kill what runs under containerd's shims
  # (each shim's cgroup is the container's) and the shims themselves.
  local shim
  for shim in $(pgrep -f "containerd-shim-runc-v2 -namespace k8s.io .*-address $n/containerd.sock" || true); do
    pkill -KILL -P "$shim" 2>/dev/null
    kill -KILL "$shim" 2>/dev/null
  done
  # Mounts under the node's directories, deepest first (the kubelet bind-mounts its root dir
  # onto itself; Secret and emptyDir volumes are tmpfs; containers' root file systems are
  # overlays), then the network namespaces containerd pinned.
  local m
  for m in $(awk -v p="$n/" 'index($2, p) == 1 || $2 == p"kubelet" {print $2}' /proc/self/mounts | sort -r); do
    umount -l "$m" 2>/dev/null
  done
  for m in $(awk '$2 ~ "^/(var/)?run/netns/cni-" {print $2}' /proc/self/mounts | sort -u); do
    umount -l "$m" 2>/dev/null && rm -f "$m"
  done
  # Host-side veths of pods whose namespace is gone disappear with it; any other veth on the
  # bridge, and the bridge itself, are deleted.
  local veth
  for veth in $(ip -o link show master "$node_bridge" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1); do
    ip link del "$veth" 2>/dev/null
  done
  ip link del "$node_bridge" 2>/dev/null
  # kube-proxy's rules (its own cleanup mode; then any KUBE- chain left, the kubelet's canary
  # chains among them).
  local bin
  bin=$(sed -n 's/^DISTR_TESTENV_BIN=//p' "$state/env" 2>/dev/null)
  [ -x "$bin/kube-proxy" ] && "$bin/kube-proxy" --cleanup >/dev/null 2>&1
  local table chain ipt
  for ipt in iptables ip6tables; do
    for table in filter nat mangle raw; do
      "$ipt" -t "$table" -S 2>/dev/null | grep -E -- '^-A .* -j KUBE-' | grep -v '^-A KUBE-' |
        while read -r -a rule; do rule[0]=-D; "$ipt" -t "$table" "${rule[@]}" 2>/dev/null; done
      for chain in $("$ipt" -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ {print $2}'); do
        "$ipt" -t "$table" -F "$chain" 2>/dev/null
      done
      for chain in $("$ipt" -t "$table" -S 2>/dev/null | awk '$1 == "-N" && $2 ~ /^KUBE-/ {print $2}'); do
        "$ipt" -t "$table" -X "$chain" 2>/dev/null
      done
    done
  done
  # The kubelet's cgroups, deepest first.
  local c try
  for try in 1 2 3 4 5 6 7 8 9 10; do
    for c in /sys/fs/cgroup/*/distr-testenv; do
      [ -d "$c" ] && find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null
    done
    ls -d /sys/fs/cgroup/*/distr-testenv >/dev/null 2>&1 || break
    sleep 0.5
  done
  rm -f "$n/running"
  [ "$(cat "$node_lock" 2>/dev/null)" = "$state" ] && rm -f "$node_lock"

  # What is left, if anything.
  pgrep -f "containerd-shim-runc-v2 .*-address $n/containerd.sock" >/dev/null && left+=("container shims")
  grep -q " $n/" /proc/self/mounts && left+=("mounts under $n")
  grep -qE ' /(var/)?run/netns/cni-' /proc/self/mounts && left+=("network namespaces")
  ip link show "$node_bridge" >/dev/null 2>&1 && left+=("bridge $node_bridge")
  [ -n "$(ip -o link show type veth 2>/dev/null)" ] && left+=("veths: $(ip -o link show type veth | awk -F': ' '{print $2}' | tr '\n' ' ')")
  { iptables-save; ip6tables-save; } 2>/dev/null | grep -q 'KUBE-' && left+=("KUBE- iptables rules")
  ls -d /sys/fs/cgroup/*/distr-testenv >/dev/null 2>&1 && left+=("cgroups /sys/fs/cgroup/*/distr-testenv")
  if [ ${#left[@]} = 0 ]; then
    node_log "real node stopped: no container, mount, network namespace, veth, bridge, netfilter rule or cgroup of it left"
  else
    node_log "real node stopped, but left behind: ${left[*]}"
    return 1
  fi
}
