//! Generated types and services of the `distr.agent.v1` gRPC contract.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod v1 {
    tonic::include_proto!("distr.agent.v1");
}

/// Encoded file descriptor set of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("distr_agent_v1_descriptor");
