//! The reconciliation of releases. The [`reconciler`] takes the desired state and hands each
//! release to its `worker`; a worker decides with the pure functions of [`plan`] and
//! [`recovery`], acts through the `ReleaseOps` trait (the API server and `helm`;
//! a fake in its unit tests) within the Helm [`slots`], and reports to the [`status_board`].
//! The worker knows the reconciler only through its small `Host` trait: the dependency runs
//! one way, from the reconciler to the worker. [`namespace`] decides which namespace the
//! releases live in when the Hub names one (or none).

pub mod namespace;
pub(crate) mod ops;
pub mod plan;
pub mod reconciler;
pub mod recovery;
pub mod slots;
pub mod status_board;
mod worker;
