//! The `distr.agent.v1.Updater` gRPC service.

use distr_agent_proto::v1::{self as pb, updater_server::Updater};
use tonic::{Request, Response, Status};

#[derive(Debug, Default)]
pub struct UpdaterService {}

#[tonic::async_trait]
impl Updater for UpdaterService {
    async fn apply_agent_manifest(
        &self,
        _: Request<pb::ApplyAgentManifestRequest>,
    ) -> Result<Response<pb::ApplyReport>, Status> {
        Err(Status::unimplemented("ApplyAgentManifest is not implemented yet"))
    }

    async fn update_status(
        &self,
        _: Request<pb::UpdateStatusRequest>,
    ) -> Result<Response<pb::UpdateStatusResponse>, Status> {
        Err(Status::unimplemented("UpdateStatus is not implemented yet"))
    }
}
