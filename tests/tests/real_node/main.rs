//! The agent as real pods on the environment's real node (`tests/env/node.sh`): what only a
//! kubelet, a container runtime, Services, cluster DNS and a NetworkPolicy engine can show.
//! A test binary of its own: it needs the real node (`DISTR_TESTENV_REAL_NODE=1`, which
//! `tests/run.sh` sets) and fails without one.

mod install;
mod interrupted;
mod memory;
mod network_policy;
mod rotation;
mod selfupdate;
