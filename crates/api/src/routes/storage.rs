//! Redundant placement over HTTP: the storage inventory and placement explanations;
//! the inventory is built in `control::storage`.

use axum::extract::State;
use axum::Json;
use model::api::{PlacementQuery, Problem, StorageInventory};
use model::Role;

use crate::{ApiError, AppJson, AppState, Caller};

/// Replaces the storage inventory (storage resources and connectivity).
#[utoipa::path(put, path = "/v1/storage", tag = "placement", request_body = StorageInventory,
    responses(
        (status = 200, body = StorageInventory),
        (status = 422, description = "every problem, with its path", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn put_storage(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(body): AppJson<StorageInventory>,
) -> Result<Json<StorageInventory>, ApiError> {
    caller.require(&[Role::Admin], "changing the storage inventory")?;
    Ok(Json(state.control().put_storage(body).await?))
}

/// The storage inventory.
#[utoipa::path(get, path = "/v1/storage", tag = "placement",
    responses((status = 200, body = StorageInventory)))]
pub(crate) async fn get_storage(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<StorageInventory>, ApiError> {
    caller.require(&[Role::Admin], "reading the storage inventory")?;
    Ok(Json(state.control().storage_doc().await?))
}

/// What a redundant VM of this size would get: the placement, or, when nothing
/// fits, which constraint failed for the best candidates (as data and as text).
/// Building the planner and explaining walk the whole inventory (up to a 2 MiB document
/// of storage and connectivity), so they run in the CPU pool; members may call this.
#[utoipa::path(post, path = "/v1/placements:explain", operation_id = "explain_placement", tag = "placement", request_body = PlacementQuery,
    responses((status = 200, description = "{placed, placement?, explanation?, text}", body = Object),
        (status = 429, description = "over the rate limit, or the server is already running as many CPU-heavy jobs as it runs at once; see Retry-After", body = Problem, content_type = "application/problem+json")))]
pub(crate) async fn explain(
    State(state): State<AppState>,
    caller: Caller,
    AppJson(q): AppJson<PlacementQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "asking for a placement")?;
    q.validate()?;
    let inputs = state.control().planner_inputs().await?;
    let req = sched::Request {
        disk_gib: q.disk_gib,
        vcpus: q.vcpus,
        memory_mib: q.memory_mib,
    };
    let answer = state
        .cpu()
        .run("placement explanation", move || {
            let p = inputs.planner()?;
            Ok::<_, ApiError>(match p.place(&req) {
                Ok(pl) => {
                    serde_json::json!({"placed": true, "placement": pl, "text": pl.to_string()})
                }
                Err(ex) => {
                    serde_json::json!({"placed": false, "explanation": ex, "text": ex.to_string()})
                }
            })
        })
        .await??;
    Ok(Json(answer))
}
