//! Resource tables of a host (docs/SHM.md): entries that every device on the host maps
//! read-only, one entry at a time writable for one device. The server keeps the spec;
//! the host's agent creates the table, serves its devices and reports its state
//! (devices, grants, entry versions, audit), which `GET` shows.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use model::api::Problem;
use model::resource_tables::{CreateResourceTable, ResourceTable, ResourceTableReport};
use model::{ResourceTableId, Role};

use crate::extract::AppPath;
use crate::routes::hosts::host_name;
use crate::routes::tenants::write_tenant;
use crate::{ApiError, AppJson, AppState, Caller, Scope};

/// Creates a resource table on the host; its agent creates it and starts serving
/// devices on the socket its report names.
#[utoipa::path(post, path = "/v1/hosts/{name}/resource-tables", operation_id = "create_resource_table", tag = "resource-tables", request_body = CreateResourceTable,
    params(("name" = String, Path, description = "host name")),
    responses(
        (status = 201, body = ResourceTable),
        (status = 404, description = "no such host", body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "name taken on the host, or the host keeps 64 tables", body = Problem, content_type = "application/problem+json"),
        (status = 422, description = "a field out of its limits (named)", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(host): AppPath,
    AppJson(body): AppJson<CreateResourceTable>,
) -> Result<(StatusCode, Json<ResourceTable>), ApiError> {
    caller.require(&[Role::Admin, Role::Member], "creating a resource table")?;
    let host = host_name(&host)?;
    let spec = body.validate()?;
    let tenant = write_tenant(&state, &caller, spec.tenant.as_ref()).await?;
    let table = state
        .control()
        .create_resource_table(tenant, &host, spec)
        .await?;
    Ok((StatusCode::CREATED, Json(table)))
}

/// The host's resource tables the caller sees (an admin or the host's agent: every
/// tenant's), each with its agent's last report.
#[utoipa::path(get, path = "/v1/hosts/{name}/resource-tables", operation_id = "list_resource_tables", tag = "resource-tables",
    params(("name" = String, Path, description = "host name")),
    responses((status = 200, body = Vec<ResourceTable>)))]
pub(crate) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    AppPath(host): AppPath,
) -> Result<Json<Vec<ResourceTable>>, ApiError> {
    caller.require(
        &[Role::Admin, Role::Member, Role::Agent],
        "listing resource tables",
    )?;
    let host = host_name(&host)?;
    // The agent keeps every tenant's tables of its host, as it runs every tenant's VMs.
    let scope = match caller.role {
        Role::Agent => Scope::All,
        _ => caller.scope()?,
    };
    Ok(Json(state.control().resource_tables(scope, &host).await?))
}

/// One resource table, by name or id: spec, devices, grants, entry versions, audit.
#[utoipa::path(get, path = "/v1/hosts/{name}/resource-tables/{table}", operation_id = "get_resource_table", tag = "resource-tables",
    params(("name" = String, Path, description = "host name"), ("table" = String, Path, description = "table name or id")),
    responses(
        (status = 200, body = ResourceTable),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "an admin named a table several tenants' share: use the id", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn get(
    State(state): State<AppState>,
    caller: Caller,
    Path((host, table)): Path<(String, String)>,
) -> Result<Json<ResourceTable>, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "reading a resource table")?;
    let host = host_name(&host)?;
    Ok(Json(
        state
            .control()
            .resource_table(caller.scope()?, &host, &table)
            .await?,
    ))
}

/// Deletes a resource table; its agent stops serving it.
#[utoipa::path(delete, path = "/v1/hosts/{name}/resource-tables/{table}", operation_id = "delete_resource_table", tag = "resource-tables",
    params(("name" = String, Path, description = "host name"), ("table" = String, Path, description = "table name or id")),
    responses(
        (status = 204, description = "deleted"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 409, description = "a VM names the table in its resource_tables (the detail names the VMs), or an admin named a table several tenants' share: use the id", body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path((host, table)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    caller.require(&[Role::Admin, Role::Member], "deleting a resource table")?;
    let host = host_name(&host)?;
    state
        .control()
        .delete_resource_table(caller.scope()?, &host, &table)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The host's agent reports one table's state. 404 once the table is deleted (the
/// agent then stops serving it).
#[utoipa::path(put, path = "/v1/hosts/{name}/resource-tables/{table}/report", operation_id = "report_resource_table", tag = "agent", request_body = ResourceTableReport,
    params(("name" = String, Path, description = "host name"), ("table" = String, Path, description = "table id")),
    responses(
        (status = 204, description = "recorded"),
        (status = 404, body = Problem, content_type = "application/problem+json"),
        (status = 422, body = Problem, content_type = "application/problem+json"),
    ))]
pub(crate) async fn report(
    State(state): State<AppState>,
    caller: Caller,
    Path((host, table)): Path<(String, String)>,
    AppJson(body): AppJson<ResourceTableReport>,
) -> Result<StatusCode, ApiError> {
    caller.require(&[Role::Agent, Role::Admin], "reporting a resource table")?;
    let host = host_name(&host)?;
    let id = table
        .parse::<ResourceTableId>()
        .map_err(|_| ApiError::NotFound {
            kind: "resource table",
            id: table.clone(),
        })?;
    body.validate()?;
    state
        .control()
        .report_resource_table(&host, id, body)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
