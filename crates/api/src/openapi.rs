//! The OpenAPI 3 document, generated from the handlers' annotations.

use utoipa::openapi::content::ContentBuilder;
use utoipa::openapi::header::HeaderBuilder;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::response::ResponseBuilder;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::openapi::{Object, Ref, RefOr, Response, Type};
use utoipa::{Modify, OpenApi};

use crate::routes;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "vinfra",
        description = "vinfra control-plane API. Errors are application/problem+json.",
    ),
    paths(
        routes::meta::openapi_doc,
        routes::meta::metrics,
        routes::tenants::create_tenant,
        routes::tenants::list_tenants,
        routes::tokens::create_token,
        routes::tokens::list_tokens,
        routes::tokens::revoke_token,
        routes::hosts::register_host,
        routes::hosts::list_hosts,
        routes::hosts::get_host,
        routes::hosts::heartbeat,
        routes::resource_tables::create,
        routes::resource_tables::list,
        routes::resource_tables::get,
        routes::resource_tables::delete,
        routes::resource_tables::report,
        routes::images::create_image,
        routes::images::list_images,
        routes::images::get_image,
        routes::images::delete_image,
        routes::join::ca_pem,
        routes::join::create_join_token,
        routes::join::join,
        routes::blobs::upload,
        routes::blobs::import,
        routes::blobs::list,
        routes::blobs::download,
        routes::vms::create_vm,
        routes::vms::list_vms,
        routes::networks::create_network,
        routes::networks::list_networks,
        routes::networks::get_network,
        routes::networks::delete_network,
        routes::vms::get_vm,
        routes::vms::start_vm,
        routes::vms::stop_vm,
        routes::vms::delete_vm,
        routes::vms::console,
        routes::traces::set_trace,
        routes::traces::get_trace,
        routes::traces::upload_trace,
        routes::vms::assignments,
        routes::hosts::host_events,
        routes::vms::report_observed,
        routes::migrations::migrate_vm,
        routes::migrations::list_migrations,
        routes::migrations::get_migration,
        routes::migrations::report_migration,
        routes::migrations::put_snapshot,
        routes::migrations::get_snapshot,
        routes::maintenance::enter,
        routes::maintenance::exit,
        routes::maintenance::list,
        routes::maintenance::get,
        routes::maintenance::abort,
        routes::operations::list,
        routes::operations::get,
        routes::operations::cancel,
        routes::traffic::get_traffic,
        routes::storage::put_storage,
        routes::storage::get_storage,
        routes::storage::explain,
        routes::descriptors::create_vnfd,
        routes::descriptors::list_vnfds,
        routes::descriptors::create_nsd,
        routes::descriptors::list_nsds,
        routes::ns_instances::create,
        routes::ns_instances::list,
        routes::ns_instances::get,
        routes::ns_instances::delete,
        routes::ns_instances::scale,
        routes::terminals::create,
        routes::terminals::list,
        routes::terminals::get,
        routes::terminals::delete,
        routes::terminals::bind,
        routes::terminals::unbind,
        routes::terminals::operations,
        routes::terminals::operation,
        routes::terminals::session,
        routes::terminals::result,
        routes::terminals::results,
        routes::slices::create_nsi,
        routes::slices::list_nsis,
        routes::slices::get_nsi,
        routes::slices::delete_nsi,
        routes::slices::associate,
        routes::slices::list_associations,
        routes::slices::record_loads,
        routes::slices::nssf_selection,
        routes::slices::ledger_head,
        routes::slices::ledger_entries,
        routes::slices::ledger_proof,
        routes::slices::ledger_consistency,
    ),
    components(schemas(model::api::Problem)),
    modifiers(&BearerAuth, &Limits, &Refusals, &Rules, &CrossField, &Examples, &Links),
    security(("bearer" = [])),
)]
struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The refusals every operation can get from the shared layers, added where a
/// handler's annotation does not already describe them more precisely: 429 (rate limit,
/// with `Retry-After`) everywhere, and 413/415/422 wherever the body is JSON (`AppJson`).
struct Limits;

fn problem(description: &str, retry_after: bool) -> RefOr<Response> {
    let mut r = ResponseBuilder::new().description(description).content(
        "application/problem+json",
        ContentBuilder::new()
            .schema(Some(Ref::from_schema_name("Problem")))
            .build(),
    );
    if retry_after {
        r = r.header(
            "Retry-After",
            HeaderBuilder::new()
                .schema(Object::with_type(Type::Integer))
                .description(Some("seconds until a retry can succeed"))
                .build(),
        );
    }
    RefOr::T(r.build())
}

impl Limits {
    fn operation(op: &mut Operation) {
        let json_body = op
            .request_body
            .as_ref()
            .is_some_and(|b| b.content.contains_key("application/json"));
        let mut add = |status: &str, response: RefOr<Response>| {
            op.responses
                .responses
                .entry(status.to_owned())
                .or_insert(response);
        };
        if json_body {
            add(
                "413",
                problem(
                    "the body is over its limit (2 MiB), named in the detail",
                    false,
                ),
            );
            add(
                "415",
                problem(
                    "Content-Type is not application/json (optionally with charset=utf-8)",
                    false,
                ),
            );
            add(
                "422",
                problem(
                    "the body is not a JSON object, or a field is wrong (named in the detail)",
                    false,
                ),
            );
        }
        add(
            "429",
            problem("over the rate limit of this token or client address", true),
        );
        // A handler's own 429 (a busy CPU pool) also sends Retry-After.
        if let Some(RefOr::T(r)) = op.responses.responses.get_mut("429") {
            r.headers
                .entry("Retry-After".to_owned())
                .or_insert_with(|| {
                    HeaderBuilder::new()
                        .schema(Object::with_type(Type::Integer))
                        .description(Some("seconds until a retry can succeed"))
                        .build()
                });
        }
    }
}

impl Modify for Limits {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        for item in doc.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                Self::operation(op);
            }
        }
    }
}

/// Every other status an operation can return, so a client generated from the
/// document knows every refusal: 401/403 where a token is needed, 400 where a body or a
/// parameter can be malformed, 404 where the path names an object, 503 where the image
/// store can be off or the cluster store may not answer (all but two), 500 everywhere. Added only where the handler's annotation does not
/// already describe the status more precisely.
struct Refusals;

/// Operations that reach the image store (503 when the server runs without one).
const IMAGE_STORE: &[(&str, &str)] = &[
    ("post", "/v1/blobs"),
    ("post", "/v1/blobs/import"),
    ("get", "/v1/blobs"),
    ("get", "/v1/blobs/{digest}"),
    ("post", "/v1/ns-instances"),
];

/// Paths answered without the store (no 503 when it does not answer).
const STORELESS: &[&str] = &["/v1/openapi.json", "/v1/ca.pem"];

/// Paths whose parameter names an object by name or id: an admin sees every tenant's,
/// so a name two tenants use is ambiguous (409, "use the id").
const BY_NAME: &[&str] = &[
    "/v1/vms/{id}",
    "/v1/networks/{name}",
    "/v1/ns-instances/{name}",
    "/v1/images/{name}",
];

const AMBIGUOUS: &str = "the name exists in several tenants (an admin sees them all): use the id";

impl Refusals {
    fn operation(method: &str, path: &str, op: &mut Operation) {
        // `security: [{}]` (an empty requirement) marks the public operations; the rest
        // inherit the document's bearer requirement.
        let public = op
            .security
            .as_ref()
            .is_some_and(|s| s.iter().any(|r| r == &SecurityRequirement::default()));
        let params = op.parameters.as_ref().is_some_and(|p| !p.is_empty());
        let path_params = op
            .parameters
            .as_ref()
            .is_some_and(|p| p.iter().any(|p| p.parameter_in == ParameterIn::Path));
        let body = op.request_body.is_some();
        let query_params = op
            .parameters
            .as_ref()
            .is_some_and(|p| p.iter().any(|p| p.parameter_in == ParameterIn::Query));
        if BY_NAME.iter().any(|p| path.starts_with(p)) {
            match op.responses.responses.get_mut("409") {
                Some(RefOr::T(r)) => {
                    if !r.description.contains(AMBIGUOUS) {
                        r.description = if r.description.is_empty() {
                            AMBIGUOUS.to_owned()
                        } else {
                            format!("{}; or {AMBIGUOUS}", r.description)
                        };
                    }
                }
                Some(RefOr::Ref(_)) => {}
                None => {
                    op.responses
                        .responses
                        .insert("409".to_owned(), problem(AMBIGUOUS, false));
                }
            }
        }
        let mut add = |status: &str, description: &str| {
            op.responses
                .responses
                .entry(status.to_owned())
                .or_insert_with(|| problem(description, false));
        };
        if body || params {
            add(
                "400",
                "the body or a parameter is malformed (named in the detail)",
            );
        }
        if query_params {
            add(
                "422",
                "a query parameter breaks a rule (named in the detail)",
            );
        }
        if !public {
            add(
                "401",
                "no bearer token, or one that is unknown, revoked or expired",
            );
            add("403", "the token's role may not do this");
        }
        if path_params {
            add("404", "no such object, or one the caller may not see");
        }
        if IMAGE_STORE.contains(&(method, path)) {
            add(
                "503",
                "this server has no image store (started without a data directory), or the cluster store did not answer (`Retry-After`)",
            );
        } else if !STORELESS.contains(&path) {
            add(
                "503",
                "the cluster store did not answer (an etcd member down, a leader election); `Retry-After` says when to try again",
            );
        }
        add("500", "internal error (the server logs the cause)");
    }
}

impl Modify for Refusals {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        for (path, item) in doc.paths.paths.iter_mut() {
            for (method, op) in [
                ("get", &mut item.get),
                ("put", &mut item.put),
                ("post", &mut item.post),
                ("delete", &mut item.delete),
                ("patch", &mut item.patch),
            ] {
                if let Some(op) = op {
                    Self::operation(method, path, op);
                }
            }
        }
    }
}

/// One validation rule of a request body's field, stated in the document.
#[derive(Debug, Clone)]
enum Rule {
    /// A string matching this regular expression.
    Pattern(String),
    /// An integer in `min..=max`.
    Range(u64, u64),
    /// A string of at most this many characters (the server counts bytes, so for
    /// non-ASCII text its limit is the tighter one).
    MaxLength(usize),
    /// A string of at least this many characters.
    MinLength(usize),
    /// An array of at most this many items.
    MaxItems(usize),
    /// One of these strings (or null: the field is optional).
    OneOf(Vec<&'static str>),
    /// An object (map) with at least this many entries.
    MinProperties(usize),
    /// An array whose items match this regular expression.
    ItemsPattern(String),
    /// A dotted IPv4 address.
    Ipv4,
    /// An example value (`examples`): for a field that names another object, one that
    /// the example fixtures hold (see [`EXAMPLE_HOST`] and the rest), so that a client or
    /// a generator starting from the document sends a request that can succeed.
    Example(serde_json::Value),
}

/// A decimal octet without leading zeros (what `Ipv4Addr`'s parser takes).
const OCTET: &str = "(25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])";
/// A port, 0..=65535, without leading zeros.
const PORT: &str =
    "(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3}|0)";

/// `IP:PORT` as `SocketAddr` parses it: dotted IPv4, or bracketed IPv6 (loosely).
fn socket_addr_pattern(prefix: &str) -> String {
    format!("^{prefix}({OCTET}(\\.{OCTET}){{3}}|\\[[0-9a-fA-F:.]+\\]):{PORT}$")
}

/// The rules the `validate()` functions of `model::api` enforce, taken from the
/// constants and patterns those functions use, so that the document cannot drift from
/// the checks: (schema, property, rule).
fn rules() -> Vec<(&'static str, &'static str, Rule)> {
    use model::api::*;
    use Rule::*;
    let name = || Pattern(model::NAME_PATTERN.to_owned());
    vec![
        ("CreateTenant", "name", name()),
        ("CreateToken", "tenant", name()),
        ("CreateToken", "tenant", Example(EXAMPLE_TENANT.into())),
        (
            "CreateToken",
            "description",
            Pattern(model::NO_CONTROL_PATTERN.to_owned()),
        ),
        ("CreateToken", "ttl_secs", Range(1, MAX_TOKEN_TTL_SECS)),
        (
            "CreateToken",
            "description",
            MaxLength(MAX_TOKEN_DESCRIPTION),
        ),
        ("RegisterHost", "name", name()),
        ("RegisterHost", "cpus", Range(1, u64::from(MAX_HOST_CPUS))),
        // At most `cpus` × the largest allocation ratio: the bound for the largest host.
        (
            "RegisterHost",
            "vcpus",
            Range(1, u64::from(MAX_HOST_CPUS * MAX_CPU_ALLOCATION_RATIO)),
        ),
        ("RegisterHost", "memory_mib", Range(1, MAX_HOST_MEMORY_MIB)),
        ("RegisterHost", "disk_gib", Range(0, MAX_HOST_DISK_GIB)),
        ("RegisterHost", "drivers", MaxItems(MAX_DRIVERS)),
        (
            "RegisterHost",
            "drivers",
            ItemsPattern(model::NAME_PATTERN.to_owned()),
        ),
        (
            "RegisterHost",
            "agent_url",
            Pattern(model::AGENT_URL_PATTERN.to_owned()),
        ),
        ("RegisterHost", "agent_url", MaxLength(2048)),
        ("RegisterHost", "uplink_ip", Ipv4),
        ("RegisterHost", "nbd_addr", Pattern(socket_addr_pattern(""))),
        (
            "RegisterHost",
            "link_addr",
            Pattern(socket_addr_pattern("")),
        ),
        ("CreateImage", "name", name()),
        ("CreateImage", "tenant", name()),
        ("CreateImage", "tenant", Example(EXAMPLE_TENANT.into())),
        ("CreateImage", "kernel", Example(example_digest().into())),
        ("CreateImage", "initrd", Example(example_digest().into())),
        (
            "CreateImage",
            "disk_template",
            Example(example_digest().into()),
        ),
        ("CreateImage", "cmdline", MaxLength(4096)),
        (
            "CreateImage",
            "cmdline",
            Pattern(model::NO_CONTROL_PATTERN.to_owned()),
        ),
        ("CreateImage", "disk_mib", Range(0, MAX_DISK_MIB)),
        ("CreateJoinToken", "ttl_secs", Range(1, MAX_JOIN_TTL_SECS)),
        ("JoinRequest", "host", name()),
        ("CreateNetwork", "name", name()),
        ("CreateNetwork", "cidr", Pattern(model::cidr_pattern())),
        ("CreateNetwork", "tenant", name()),
        ("CreateNetwork", "tenant", Example(EXAMPLE_TENANT.into())),
        ("NicRequest", "network", name()),
        ("NicRequest", "network", Example(EXAMPLE_NETWORK.into())),
        ("NicRequest", "name", name()),
        ("NicRequest", "ip", Ipv4),
        ("CreateVm", "name", name()),
        ("CreateVm", "image", name()),
        ("CreateVm", "image", Example(EXAMPLE_IMAGE.into())),
        ("CreateVm", "vcpus", Range(1, u64::from(MAX_VCPUS))),
        (
            "CreateVm",
            "memory_mib",
            Range(MIN_VM_MEMORY_MIB, MAX_VM_MEMORY_MIB),
        ),
        ("CreateVm", "host", name()),
        ("CreateVm", "host", Example(EXAMPLE_HOST.into())),
        ("CreateVm", "tenant", name()),
        ("CreateVm", "tenant", Example(EXAMPLE_TENANT.into())),
        ("CreateVm", "disk_gib", Range(1, MAX_DISK_MIB >> 10)),
        ("CreateVm", "nics", MaxItems(MAX_NICS)),
        ("CreateVm", "kernel_args", MaxLength(MAX_KERNEL_ARGS)),
        (
            "CreateVm",
            "kernel_args",
            Pattern(model::NO_CONTROL_PATTERN.to_owned()),
        ),
        ("ObservedReport", "host", name()),
        ("ObservedReport", "error", MaxLength(MAX_ERROR_LEN)),
        (
            "ObservedReport",
            "console_tail",
            MaxLength(MAX_CONSOLE_TAIL),
        ),
        (
            "CreateNsInstance",
            "name",
            Pattern("^[a-z][a-z0-9-]{0,19}$".to_owned()),
        ),
        ("CreateNsInstance", "nsd", MinLength(1)),
        ("CreateNsInstance", "sites", MinProperties(1)),
        (
            "CreateNsInstance",
            "link_deadline_ms",
            Range(100, MAX_LINK_DEADLINE_MS),
        ),
        ("MigrateVm", "to", name()),
        ("MigrateVm", "strategy", OneOf(STRATEGIES.to_vec())),
        ("EnterMaintenance", "strategy", OneOf(STRATEGIES.to_vec())),
        (
            "MigrationReport",
            "incoming_uri",
            Pattern(socket_addr_pattern("tcp:")),
        ),
        ("MigrationReport", "host", name()),
        ("MigrationReport", "error", MaxLength(MAX_ERROR_LEN)),
        ("EnterMaintenance", "to", name()),
        ("ImportBlob", "path", MaxLength(4096)),
        ("ImportBlob", "path", Example(EXAMPLE_IMPORT_PATH.into())),
        ("PlacementQuery", "disk_gib", Range(1, MAX_DISK_MIB >> 10)),
        ("PlacementQuery", "vcpus", Range(1, u64::from(MAX_VCPUS))),
        (
            "PlacementQuery",
            "memory_mib",
            Range(MIN_VM_MEMORY_MIB, MAX_VM_MEMORY_MIB),
        ),
    ]
}

/// States [`rules`] in the component schemas.
struct Rules;

impl Rules {
    /// Applies every rule; returns the ones whose schema or property is missing.
    fn apply(doc: &mut utoipa::openapi::OpenApi) -> Vec<String> {
        use utoipa::openapi::schema::{ArrayItems, KnownFormat, SchemaFormat};
        use utoipa::openapi::Schema;
        let mut missing = Vec::new();
        let schemas = &mut doc.components.get_or_insert_with(Default::default).schemas;
        for (schema, property, rule) in rules() {
            let prop = match schemas.get_mut(schema) {
                Some(RefOr::T(Schema::Object(o))) => o.properties.get_mut(property),
                _ => None,
            };
            let num = |n: u64| usize::try_from(n).map(utoipa::Number::UInt).ok();
            let applied = match (prop, &rule) {
                (Some(RefOr::T(Schema::Object(o))), Rule::Pattern(p)) => {
                    o.pattern = Some(p.clone());
                    true
                }
                (Some(RefOr::T(Schema::Object(o))), Rule::Range(min, max)) => {
                    o.minimum = num(*min);
                    o.maximum = num(*max);
                    true
                }
                (Some(RefOr::T(Schema::Object(o))), Rule::MaxLength(n)) => {
                    o.max_length = Some(*n);
                    true
                }
                (Some(RefOr::T(Schema::Object(o))), Rule::MinLength(n)) => {
                    o.min_length = Some(*n);
                    true
                }
                (Some(RefOr::T(Schema::Object(o))), Rule::OneOf(values)) => {
                    let mut e: Vec<serde_json::Value> =
                        values.iter().map(|v| (*v).into()).collect();
                    e.push(serde_json::Value::Null);
                    o.enum_values = Some(e);
                    true
                }
                (Some(RefOr::T(Schema::Object(o))), Rule::MinProperties(n)) => {
                    o.min_properties = Some(*n);
                    true
                }
                (Some(RefOr::T(Schema::Object(o))), Rule::Ipv4) => {
                    o.format = Some(SchemaFormat::KnownFormat(KnownFormat::Ipv4));
                    true
                }
                (Some(RefOr::T(Schema::Object(o))), Rule::Example(v)) => {
                    o.examples = vec![v.clone()];
                    true
                }
                (Some(RefOr::T(Schema::Array(a))), Rule::MaxItems(n)) => {
                    a.max_items = Some(*n);
                    true
                }
                (Some(RefOr::T(Schema::Array(a))), Rule::ItemsPattern(p)) => match &mut a.items {
                    ArrayItems::RefOrSchema(item) => match item.as_mut() {
                        RefOr::T(Schema::Object(o)) => {
                            o.pattern = Some(p.clone());
                            true
                        }
                        _ => false,
                    },
                    _ => false,
                },
                _ => false,
            };
            if !applied {
                missing.push(format!("{schema}.{property}: {rule:?}"));
            }
        }
        missing
    }
}

impl Modify for Rules {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        // A rule that finds no place is a test failure (`every_rule_is_stated`), not a
        // reason to fail serving the document.
        let _ = Self::apply(doc);
    }
}

/// The objects the document's examples name. A server holding them accepts the
/// examples as they are: `scripts/schemathesis.sh` creates them before it generates
/// requests from the document (it reads their names from the document, so the two
/// cannot drift). On another server the names are only illustrations.
pub const EXAMPLE_HOST: &str = "h1";
/// The image the VM examples boot (see [`EXAMPLE_HOST`]).
pub const EXAMPLE_IMAGE: &str = "debian";
/// The network the NIC examples attach to (see [`EXAMPLE_HOST`]).
pub const EXAMPLE_NETWORK: &str = "net";
/// The tenant the `tenant` examples name: the one created on an admin's first create
/// without a tenant.
pub const EXAMPLE_TENANT: &str = "default";
/// The bytes of the example blob: the blob upload's example body, whose digest the
/// image examples name.
pub const EXAMPLE_BLOB: &[u8] = b"kernel\n";
/// The example file in the server's import directory (`POST /v1/blobs/import`).
pub const EXAMPLE_IMPORT_PATH: &str = "kernel";

/// `sha256:` and the hex digest of [`EXAMPLE_BLOB`].
pub fn example_digest() -> String {
    use sha2::Digest;
    format!(
        "{}{:x}",
        model::DIGEST_PREFIX,
        sha2::Sha256::digest(EXAMPLE_BLOB)
    )
}

/// The rules that tie one field to another, in JSON Schema (2020-12, which OpenAPI 3.1
/// uses): (schema, subschema the request must also match). Each mirrors a check of the
/// schema's `validate()`; a schema's rules are stated as its `allOf`.
fn cross_field_rules() -> Vec<(&'static str, serde_json::Value)> {
    use serde_json::json;
    let present =
        |field: &str, ty: &str| json!({"required": [field], "properties": {field: {"type": ty}}});
    vec![
        // CreateImage::validate: "an image needs a kernel or a disk_template"; "initrd
        // needs a kernel" (a null field is an absent one).
        (
            "CreateImage",
            json!({"anyOf": [present("kernel", "string"), present("disk_template", "string")]}),
        ),
        (
            "CreateImage",
            json!({"if": present("initrd", "string"), "then": present("kernel", "string")}),
        ),
        // CreateVm::validate: `disk_gib` only with `redundant: true`; a redundant VM
        // names no host (its storage pair places it).
        (
            "CreateVm",
            json!({"if": present("disk_gib", "integer"),
                   "then": {"required": ["redundant"], "properties": {"redundant": {"const": true}}}}),
        ),
        (
            "CreateVm",
            json!({"if": {"required": ["redundant"], "properties": {"redundant": {"const": true}}},
                   "then": {"properties": {"host": {"type": "null"}}}}),
        ),
        // CreateToken::validate: a member token names its tenant; an admin or agent
        // token names none. (A member caller may leave its own tenant out.)
        (
            "CreateToken",
            json!({
                "if": {"properties": {"role": {"const": "member"}}},
                "then": {"required": ["tenant"],
                         "properties": {"tenant": {"type": "string", "examples": [EXAMPLE_TENANT]}}},
                "else": {"properties": {"tenant": {"type": "null"}}},
            }),
        ),
    ]
}

/// States [`cross_field_rules`] in the component schemas.
struct CrossField;

impl CrossField {
    /// Applies every rule; returns the ones whose schema is missing.
    fn apply(doc: &mut utoipa::openapi::OpenApi) -> Vec<String> {
        use utoipa::openapi::extensions::Extensions;
        use utoipa::openapi::Schema;
        let mut missing = Vec::new();
        let schemas = &mut doc.components.get_or_insert_with(Default::default).schemas;
        for (schema, rule) in cross_field_rules() {
            match schemas.get_mut(schema) {
                Some(RefOr::T(Schema::Object(o))) => {
                    // One key in the (unordered) extensions map: the document's text is
                    // the same on every run.
                    let all_of = o
                        .extensions
                        .get_or_insert_with(Extensions::default)
                        .entry("allOf".to_owned())
                        .or_insert_with(|| serde_json::Value::Array(Vec::new()));
                    match all_of.as_array_mut() {
                        Some(rules) => rules.push(rule),
                        None => missing.push(format!("{schema}: allOf is not an array")),
                    }
                }
                _ => missing.push(format!("{schema}: {rule}")),
            }
        }
        missing
    }
}

impl Modify for CrossField {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        // As with `Rules`: a missing schema is a test failure (`every_rule_is_stated`).
        let _ = Self::apply(doc);
    }
}

/// Whole-request examples that name the example objects ([`EXAMPLE_HOST`] and the
/// rest), and the blob upload's body as what it is: bytes.
struct Examples;

impl Modify for Examples {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use serde_json::json;
        use utoipa::openapi::schema::{KnownFormat, ObjectBuilder, SchemaFormat};
        use utoipa::openapi::Schema;
        let digest = example_digest();
        if let Some(RefOr::T(Schema::Object(o))) = doc
            .components
            .as_mut()
            .and_then(|c| c.schemas.get_mut("CreateImage"))
        {
            o.example = Some(json!({"name": "alpine", "kernel": digest, "disk_mib": 1024}));
        }
        let Some(op) = doc
            .paths
            .paths
            .get_mut("/v1/blobs")
            .and_then(|item| item.post.as_mut())
        else {
            return;
        };
        if let Some(media) = op
            .request_body
            .as_mut()
            .and_then(|b| b.content.get_mut("application/octet-stream"))
        {
            media.schema = Some(RefOr::T(Schema::Object(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
                    .build(),
            )));
            media.example = Some(String::from_utf8_lossy(EXAMPLE_BLOB).into_owned().into());
        }
        for p in op.parameters.iter_mut().flatten() {
            if p.name == "expect" {
                if let Some(RefOr::T(Schema::Object(o))) = p.schema.as_mut() {
                    o.examples = vec![digest.clone().into()];
                }
            }
        }
    }
}

/// OpenAPI links from each create to the operations on what it made, so that a
/// stateful client (schemathesis) can follow them: (create method, path, status,
/// [(operation id, path parameter, response body field)]).
#[allow(clippy::type_complexity)]
const LINKS: &[(&str, &str, &str, &[(&str, &str, &str)])] = &[
    (
        "post",
        "/v1/networks",
        "201",
        &[
            ("get_network", "name", "id"),
            ("delete_network", "name", "id"),
        ],
    ),
    (
        "post",
        "/v1/vms",
        "201",
        &[
            ("get_vm", "id", "id"),
            ("start_vm", "id", "id"),
            ("stop_vm", "id", "id"),
            ("get_console", "id", "id"),
            ("delete_vm", "id", "id"),
        ],
    ),
    (
        "post",
        "/v1/images",
        "201",
        &[("get_image", "name", "id"), ("delete_image", "name", "id")],
    ),
    ("post", "/v1/tokens", "201", &[("revoke_token", "id", "id")]),
    (
        "post",
        "/v1/hosts",
        "201",
        &[
            ("get_host", "name", "name"),
            ("heartbeat", "name", "name"),
            ("list_assignments", "name", "name"),
        ],
    ),
    (
        "post",
        "/v1/blobs",
        "201",
        &[("download_blob", "digest", "digest")],
    ),
    (
        "post",
        "/v1/ns-instances",
        "202",
        &[
            ("get_ns_instance", "name", "id"),
            ("delete_ns_instance", "name", "id"),
        ],
    ),
];

/// States [`LINKS`] in the create operations' responses.
struct Links;

impl Modify for Links {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::extensions::Extensions;
        use utoipa::openapi::link::LinkBuilder;
        for (method, path, status, links) in LINKS {
            let Some(item) = doc.paths.paths.get_mut(*path) else {
                continue;
            };
            let op = match *method {
                "post" => item.post.as_mut(),
                _ => None,
            };
            let Some(RefOr::T(response)) =
                op.and_then(|op| op.responses.responses.get_mut(*status))
            else {
                continue;
            };
            for (operation_id, param, field) in *links {
                response.links.insert(
                    (*operation_id).to_owned(),
                    RefOr::T(
                        LinkBuilder::new()
                            .parameter(*param, format!("$response.body#/{field}"))
                            // utoipa 5 serializes `Link::operation_id` as `operation_id`,
                            // not `operationId`; the flattened extensions map writes the
                            // key as given.
                            .extensions(Some(Extensions::from_iter([(
                                "operationId",
                                *operation_id,
                            )])))
                            .build(),
                    ),
                );
            }
        }
    }
}

/// The OpenAPI document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

/// The OpenAPI document as pretty JSON (what `GET /v1/openapi.json` serves).
pub fn openapi_json() -> String {
    // Serializing a document of plain maps and strings cannot fail; fall back
    // to an empty object rather than panic.
    openapi()
        .to_pretty_json()
        .unwrap_or_else(|_| "{}".to_owned())
}

#[cfg(test)]
mod tests {
    use model::api::*;
    use serde_json::Value;

    use super::*;

    fn doc() -> Value {
        serde_json::to_value(openapi()).unwrap()
    }

    fn prop<'a>(doc: &'a Value, schema: &str, property: &str) -> &'a Value {
        &doc["components"]["schemas"][schema]["properties"][property]
    }

    /// Operation ids are unique (OpenAPI requires it; links name them) and every link
    /// names an operation that takes the parameter it fills.
    #[test]
    fn operation_ids_are_unique_and_links_resolve() {
        let d = doc();
        let mut ids = std::collections::BTreeMap::new();
        for (path, item) in d["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let id = op["operationId"].as_str().unwrap().to_owned();
                let params: Vec<String> = op["parameters"]
                    .as_array()
                    .map(|ps| {
                        ps.iter()
                            .map(|p| p["name"].as_str().unwrap().to_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                let before = ids.insert(id.clone(), params);
                assert!(before.is_none(), "operationId {id} twice ({method} {path})");
            }
        }
        let mut n = 0;
        for (method, path, status, links) in LINKS {
            let response = &d["paths"][path][method]["responses"][status];
            for (operation_id, param, _) in *links {
                let link = &response["links"][operation_id];
                assert_eq!(
                    link["operationId"], *operation_id,
                    "{method} {path} {status}"
                );
                assert!(
                    ids[*operation_id].iter().any(|p| p == param),
                    "{operation_id} {param}"
                );
                n += 1;
            }
        }
        assert!(n > 10);
    }

    #[test]
    fn every_rule_is_stated() {
        let mut d = ApiDoc::openapi();
        assert_eq!(Rules::apply(&mut d), Vec::<String>::new());
        assert_eq!(CrossField::apply(&mut d), Vec::<String>::new());
    }

    /// The examples name the example objects, and the image examples the example blob.
    #[test]
    fn examples_name_the_example_objects() {
        let d = doc();
        assert_eq!(prop(&d, "CreateVm", "host")["examples"][0], EXAMPLE_HOST);
        assert_eq!(prop(&d, "CreateVm", "image")["examples"][0], EXAMPLE_IMAGE);
        assert_eq!(
            prop(&d, "NicRequest", "network")["examples"][0],
            EXAMPLE_NETWORK
        );
        assert_eq!(
            d["components"]["schemas"]["CreateImage"]["example"]["kernel"],
            example_digest()
        );
        let upload = &d["paths"]["/v1/blobs"]["post"];
        assert_eq!(
            upload["requestBody"]["content"]["application/octet-stream"]["example"],
            std::str::from_utf8(EXAMPLE_BLOB).unwrap()
        );
        assert_eq!(
            upload["parameters"][0]["schema"]["examples"][0],
            example_digest()
        );
        // The example digest is one the server accepts.
        model::parse_digest("kernel", &example_digest()).unwrap();
    }

    /// The text patterns refuse exactly the characters `validate_cmdline` refuses.
    #[test]
    fn no_control_pattern_is_char_is_control() {
        let class = model::NO_CONTROL_PATTERN;
        assert_eq!(class, "^[^\\x00-\\x1f\\x7f-\\x9f]*$");
        for c in (0u32..0x2000).filter_map(char::from_u32) {
            let in_class = matches!(c as u32, 0x00..=0x1f | 0x7f..=0x9f);
            assert_eq!(in_class, c.is_control(), "{c:?}");
            assert_eq!(
                model::validate_cmdline("f", &c.to_string()).is_err(),
                in_class,
                "{c:?}"
            );
        }
    }

    /// The documented bounds are the constants `validate()` uses.
    #[test]
    fn documented_bounds_are_the_validation_constants() {
        let d = doc();
        let bounds = |s: &str, p: &str| {
            let v = prop(&d, s, p);
            (v["minimum"].as_u64(), v["maximum"].as_u64())
        };
        assert_eq!(
            bounds("CreateVm", "vcpus"),
            (Some(1), Some(u64::from(MAX_VCPUS)))
        );
        assert_eq!(
            bounds("CreateVm", "memory_mib"),
            (Some(MIN_VM_MEMORY_MIB), Some(MAX_VM_MEMORY_MIB))
        );
        assert_eq!(
            bounds("RegisterHost", "cpus"),
            (Some(1), Some(u64::from(MAX_HOST_CPUS)))
        );
        assert_eq!(
            bounds("CreateJoinToken", "ttl_secs"),
            (Some(1), Some(MAX_JOIN_TTL_SECS))
        );
        assert_eq!(prop(&d, "CreateVm", "nics")["maxItems"], MAX_NICS);
        for (s, p) in [
            ("CreateTenant", "name"),
            ("CreateVm", "name"),
            ("CreateNetwork", "name"),
            ("CreateImage", "name"),
            ("RegisterHost", "name"),
        ] {
            assert_eq!(prop(&d, s, p)["pattern"], model::NAME_PATTERN, "{s}.{p}");
        }
        assert_eq!(
            prop(&d, "CreateNetwork", "cidr")["pattern"],
            model::cidr_pattern()
        );
    }

    /// Every request body names the fields it cannot do without as required.
    #[test]
    fn required_fields() {
        let d = doc();
        let required = |s: &str| -> Vec<String> {
            let mut r: Vec<String> =
                serde_json::from_value(d["components"]["schemas"][s]["required"].clone())
                    .unwrap_or_default();
            r.sort();
            r
        };
        assert_eq!(
            required("CreateVm"),
            ["image", "memory_mib", "name", "vcpus"]
        );
        assert_eq!(required("CreateNetwork"), ["cidr", "name"]);
        assert_eq!(required("CreateImage"), ["disk_mib", "name"]);
        assert_eq!(
            required("RegisterHost"),
            ["cpus", "disk_gib", "memory_mib", "name"]
        );
        assert_eq!(required("CreateToken"), ["role"]);
    }
}
