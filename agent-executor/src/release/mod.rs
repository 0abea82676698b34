//! The reconciliation of releases: the [`plan`] of a pass, [`recovery`] of interrupted
//! operations, the per-release [`worker`]s, the [`status_board`] they report to, and the
//! [`reconciler`] that hands each worker its desired state.

mod ops;
pub mod plan;
pub mod reconciler;
pub mod recovery;
pub mod status_board;
mod worker;
