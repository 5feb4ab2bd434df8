//! v2x tests: the VIS and the V2X API on loopback (every body checked against the MEC 030
//! OpenAPI document), and two operators in network namespaces (needs root, `ip`, `nft`).

mod lab;
mod vis;

use serde_json::Value;

/// The MEC 030 document and the v3.1.1 additions, merged, as JSON.
pub fn mec030() -> Value {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/openapi");
    let load = |f: &str| -> Value {
        let text =
            std::fs::read_to_string(format!("{dir}/{f}")).expect("the vendored document is there");
        serde_yaml_ng::from_str(&text).expect("the vendored document is YAML")
    };
    let mut doc = load("MEC030_V2XInformationService.yaml");
    v2x::schema::merge(&mut doc, &load("mec030-v3.1.1-additions.yaml"));
    doc
}

/// Asserts `v` is a valid `schema`.
#[track_caller]
pub fn valid(doc: &Value, schema: &str, v: &Value) {
    let e = v2x::schema::check(doc, schema, v);
    assert!(e.is_empty(), "{schema} invalid: {e:?}\n{v:#}");
}
