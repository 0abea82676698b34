//! The objects of a release: what its manifest holds ([`manifest`]), how healthy they are
//! ([`health`]), and the rollout restart of its workloads ([`restart`]).

pub mod health;
pub mod manifest;
pub mod readiness;
pub mod restart;
