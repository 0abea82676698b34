//! The `distr.agent.v1.Updater` gRPC service: converts and delegates to the [`Engine`].

use distr_agent_proto::v1::{self as pb, updater_server::Updater};
use tonic::{Request, Response, Status};

use crate::engine::{Engine, Phase, StartError};

pub struct UpdaterService {
    engine: Engine,
}

impl UpdaterService {
    pub fn new(engine: Engine) -> Self {
        Self { engine }
    }
}

fn phase(phase: Phase) -> pb::UpdatePhase {
    match phase {
        Phase::Idle => pb::UpdatePhase::Idle,
        Phase::Validating => pb::UpdatePhase::Validating,
        Phase::Applying => pb::UpdatePhase::Applying,
        Phase::Waiting => pb::UpdatePhase::Waiting,
        Phase::RollingBack => pb::UpdatePhase::RollingBack,
        Phase::Done => pb::UpdatePhase::Done,
        Phase::Failed => pb::UpdatePhase::Failed,
    }
}

#[tonic::async_trait]
impl Updater for UpdaterService {
    async fn apply_agent_manifest(
        &self,
        request: Request<pb::ApplyAgentManifestRequest>,
    ) -> Result<Response<pb::ApplyReport>, Status> {
        let request = request.into_inner();
        if request.target_version_id.is_empty() {
            return Err(Status::invalid_argument("target_version_id is required"));
        }
        let version = request.target_version_id.clone();
        match self.engine.start(request.manifest, version.clone()).await {
            Ok(applied) => Ok(Response::new(pb::ApplyReport {
                target_version_id: version,
                applied: applied
                    .into_iter()
                    .map(|o| pb::AppliedObject {
                        api_version: o.api_version,
                        kind: o.kind,
                        name: o.name,
                    })
                    .collect(),
            })),
            Err(error @ StartError::Refused(_)) => Err(Status::invalid_argument(error.to_string())),
            Err(error @ (StartError::Busy(_) | StartError::FailedBefore(_))) => {
                Err(Status::failed_precondition(error.to_string()))
            }
            Err(error @ (StartError::Cluster(_) | StartError::NotReady(_))) => {
                Err(Status::unavailable(error.to_string()))
            }
        }
    }

    async fn update_status(
        &self,
        _: Request<pb::UpdateStatusRequest>,
    ) -> Result<Response<pb::UpdateStatusResponse>, Status> {
        let state = self.engine.status();
        let previous_version_id = self.engine.previous_version_id();
        Ok(Response::new(pb::UpdateStatusResponse {
            target_version_id: state.target_version_id,
            phase: phase(state.phase).into(),
            message: state.message,
            changed_at: state.changed_at.map(|t| prost_types::Timestamp {
                seconds: t.timestamp(),
                nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
            }),
            failed_version_ids: state.failed_version_ids,
            previous_version_id,
        }))
    }
}
