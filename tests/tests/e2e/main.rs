//! The end-to-end suite, as one test binary so that `--test-threads` runs every test in
//! parallel against the one control plane `tests/run.sh` starts.

mod admission;
mod cancellation;
mod cluster_scope;
mod demo;
mod deploy;
mod environment;
mod executor_restart;
mod guide;
mod harness;
mod hub_to_helm;
mod logs_and_metrics;
mod long_operations;
mod mtls;
mod planted;
mod policy;
mod reliability;
mod selfupdate;
mod watches;
