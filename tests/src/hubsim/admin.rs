//! A small HTTP interface to a simulator's target, for the standalone `hubsim` binary that the
//! demo (and a person trying the agent) drives with `curl`:
//!
//! | request | effect |
//! |---|---|
//! | `GET /deployments` | the target's deployments, each with the latest status the Hub received |
//! | `POST /deployments` | adds a deployment (`releaseName`, `chartUrl`, `chartVersion`, `values`, ...); ids are filled in |
//! | `PATCH /deployments/{release}` | merges the body into that deployment and gives it a new revision |
//! | `DELETE /deployments/{release}` | removes it (the agent uninstalls the release) |
//! | `PUT /version` | `{"id", "name"}`: the agent version the Hub wants the target to run |
//! | `PUT /manifest` | the manifest served at the manifest endpoint (text body) |

use std::sync::Arc;

use axum::{
    Json, Router,
    extract::{Path, State},
    http::StatusCode,
    routing::{get, patch, put},
};
use serde_json::{Value, json};
use uuid::Uuid;

use super::HubSim;

#[derive(Clone)]
struct Admin {
    sim: Arc<HubSim>,
    target: Uuid,
}

type Answer = (StatusCode, Json<Value>);

fn problem(status: StatusCode, message: impl Into<String>) -> Answer {
    (status, Json(json!({"error": message.into()})))
}

/// The admin routes for `target` of `sim`.
pub fn router(sim: Arc<HubSim>, target: Uuid) -> Router {
    Router::new()
        .route("/deployments", get(list).post(add))
        .route("/deployments/{release}", patch(change).delete(remove))
        .route("/version", put(version))
        .route("/manifest", put(manifest))
        .with_state(Admin { sim, target })
}

async fn list(State(admin): State<Admin>) -> Json<Value> {
    let latest = admin.sim.latest_statuses(admin.target);
    let deployments: Vec<Value> = admin
        .sim
        .deployments(admin.target)
        .into_iter()
        .map(|mut d| {
            let revision = d["revisionId"].as_str().unwrap_or_default().to_owned();
            d["status"] = match latest.get(&revision) {
                Some(s) => json!({"type": s.status_type, "message": s.message, "receivedAt": s.received_at}),
                None => Value::Null,
            };
            d
        })
        .collect();
    Json(Value::Array(deployments))
}

async fn add(State(admin): State<Admin>, Json(mut deployment): Json<Value>) -> Answer {
    let Some(release) = deployment["releaseName"].as_str().map(str::to_owned) else {
        return problem(StatusCode::BAD_REQUEST, "releaseName is required");
    };
    let mut all = admin.sim.deployments(admin.target);
    if all.iter().any(|d| d["releaseName"] == release.as_str()) {
        return problem(StatusCode::CONFLICT, format!("{release} exists; PATCH it"));
    }
    for (key, default) in [
        ("id", json!(Uuid::new_v4())),
        ("revisionId", json!(Uuid::new_v4())),
        ("values", json!({})),
        ("logsEnabled", json!(false)),
        ("forceRestart", json!(false)),
        ("ignoreRevisionSkew", json!(false)),
    ] {
        if deployment.get(key).is_none() {
            deployment[key] = default;
        }
    }
    all.push(deployment.clone());
    admin.sim.set_deployments(admin.target, all);
    (StatusCode::CREATED, Json(deployment))
}

async fn change(State(admin): State<Admin>, Path(release): Path<String>, Json(changes): Json<Value>) -> Answer {
    let Value::Object(changes) = changes else {
        return problem(StatusCode::BAD_REQUEST, "the body must be a JSON object");
    };
    let mut all = admin.sim.deployments(admin.target);
    let Some(deployment) = all.iter_mut().find(|d| d["releaseName"] == release.as_str()) else {
        return problem(StatusCode::NOT_FOUND, format!("no deployment {release}"));
    };
    if let Some(object) = deployment.as_object_mut() {
        object.extend(changes);
        object.insert("revisionId".into(), json!(Uuid::new_v4()));
    }
    let changed = deployment.clone();
    admin.sim.set_deployments(admin.target, all);
    (StatusCode::OK, Json(changed))
}

async fn remove(State(admin): State<Admin>, Path(release): Path<String>) -> StatusCode {
    let mut all = admin.sim.deployments(admin.target);
    let before = all.len();
    all.retain(|d| d["releaseName"] != release.as_str());
    if all.len() == before {
        return StatusCode::NOT_FOUND;
    }
    admin.sim.set_deployments(admin.target, all);
    StatusCode::NO_CONTENT
}

async fn version(State(admin): State<Admin>, Json(body): Json<Value>) -> StatusCode {
    let (Some(id), Some(name)) = (
        body["id"].as_str().and_then(|id| id.parse::<Uuid>().ok()),
        body["name"].as_str(),
    ) else {
        return StatusCode::BAD_REQUEST;
    };
    admin.sim.set_agent_version(admin.target, id, name);
    StatusCode::NO_CONTENT
}

async fn manifest(State(admin): State<Admin>, body: String) -> StatusCode {
    admin.sim.set_manifest(admin.target, &body);
    StatusCode::NO_CONTENT
}
