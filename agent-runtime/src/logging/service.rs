//! The `AgentLogs` gRPC service: the executor and the updater hand their own log lines to the
//! poller through it (see [`super::capture`]).

use distr_agent_proto::v1::{
    self as pb,
    agent_logs_server::{AgentLogs, AgentLogsServer},
};
use tonic::{Request, Response, Status};

use super::capture::LogBuffer;

/// Most lines one `Collect` returns.
const MAX_LINES: usize = 1000;

/// Serves a process's [`LogBuffer`].
pub struct AgentLogsService {
    buffer: LogBuffer,
}

impl AgentLogsService {
    pub fn server(buffer: LogBuffer) -> AgentLogsServer<Self> {
        AgentLogsServer::new(Self { buffer })
    }
}

/// Up to `max` lines of `buffer` after `after`, as the `Collect` reply carries them (also what
/// the poller reads from its own buffer).
pub fn collect_reply(buffer: &LogBuffer, after: u64, max: usize) -> pb::CollectAgentLogsResponse {
    let collected = buffer.collect(after, max);
    pb::CollectAgentLogsResponse {
        lines: collected
            .lines
            .into_iter()
            .map(|line| pb::AgentLogLine {
                sequence: line.sequence,
                timestamp: Some(prost_types::Timestamp::from(line.timestamp)),
                severity: line.severity.to_owned(),
                body: line.body,
            })
            .collect(),
        dropped: collected.dropped,
        instance: buffer.instance().to_owned(),
    }
}

#[tonic::async_trait]
impl AgentLogs for AgentLogsService {
    async fn collect(
        &self,
        request: Request<pb::CollectAgentLogsRequest>,
    ) -> Result<Response<pb::CollectAgentLogsResponse>, Status> {
        let request = request.into_inner();
        let max = usize::try_from(request.max_lines)
            .unwrap_or(MAX_LINES)
            .clamp(1, MAX_LINES);
        Ok(Response::new(collect_reply(&self.buffer, request.after, max)))
    }

    async fn ack(
        &self,
        request: Request<pb::AckAgentLogsRequest>,
    ) -> Result<Response<pb::AckAgentLogsResponse>, Status> {
        let request = request.into_inner();
        if request.instance == self.buffer.instance() {
            self.buffer.ack(request.through);
        }
        Ok(Response::new(pb::AckAgentLogsResponse {}))
    }
}
