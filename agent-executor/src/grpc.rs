//! The `distr.agent.v1.Executor` gRPC service.

use distr_agent_proto::v1::{self as pb, executor_server::Executor};
use tonic::{Request, Response, Status};

#[derive(Debug, Default)]
pub struct ExecutorService {}

#[tonic::async_trait]
impl Executor for ExecutorService {
    async fn sync(&self, _: Request<pb::SyncRequest>) -> Result<Response<pb::SyncResponse>, Status> {
        Err(Status::unimplemented("Sync is not implemented yet"))
    }

    async fn list_releases(
        &self,
        _: Request<pb::ListReleasesRequest>,
    ) -> Result<Response<pb::ListReleasesResponse>, Status> {
        Err(Status::unimplemented("ListReleases is not implemented yet"))
    }

    async fn get_release(&self, _: Request<pb::GetReleaseRequest>) -> Result<Response<pb::GetReleaseResponse>, Status> {
        Err(Status::unimplemented("GetRelease is not implemented yet"))
    }

    async fn rollback(&self, _: Request<pb::RollbackRequest>) -> Result<Response<pb::RollbackResponse>, Status> {
        Err(Status::unimplemented("Rollback is not implemented yet"))
    }

    async fn collect_logs(
        &self,
        _: Request<pb::CollectLogsRequest>,
    ) -> Result<Response<pb::CollectLogsResponse>, Status> {
        Err(Status::unimplemented("CollectLogs is not implemented yet"))
    }

    async fn ack_logs(&self, _: Request<pb::AckLogsRequest>) -> Result<Response<pb::AckLogsResponse>, Status> {
        Err(Status::unimplemented("AckLogs is not implemented yet"))
    }

    async fn cluster_metrics(
        &self,
        _: Request<pb::ClusterMetricsRequest>,
    ) -> Result<Response<pb::ClusterMetricsResponse>, Status> {
        Err(Status::unimplemented("ClusterMetrics is not implemented yet"))
    }
}
