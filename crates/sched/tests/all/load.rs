use std::path::Path;

use sched::{Inventory, LoadError, Problem};

fn errors(yaml: &str) -> Vec<String> {
    match Inventory::from_yaml_str(yaml) {
        Err(LoadError::Invalid(e)) => e.errors.iter().map(ToString::to_string).collect(),
        other => panic!("expected an invalid inventory, got {other:?}"),
    }
}

#[test]
fn example_file_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/storage.yaml");
    let inv = Inventory::load_file(&path).unwrap();
    assert_eq!(inv.storage.len(), 4);
    assert_eq!(inv.servers.len(), 5);
    assert!(!inv.servers[3].live);
    assert!(inv.servers[4].in_maintenance);
    assert!(inv.reaches(&"host-b".into(), &"array-c".into()));
}

#[test]
fn missing_file_names_the_path() {
    let err = Inventory::load_file(Path::new("/nonexistent/storage.yaml")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "cannot read inventory /nonexistent/storage.yaml"
    );
}

#[test]
fn missing_field_names_its_path() {
    let yaml = r#"
storage:
  - { name: a, capacity_gib: 10, free_gib: 10, failure_domain: r1 }
  - { name: b, capacity_gib: 10, free_gib: 10, failure_domain: r1 }
  - { name: c, capacity_gib: 10, free_gib: 10, failure_domain: r1 }
  - { name: d, capacity_gib: 10, free_gib: 10 }
"#;
    assert_eq!(errors(yaml), ["storage[3].failure_domain: missing"]);
}

#[test]
fn every_structural_error_is_reported_with_its_path() {
    let yaml = r#"
storage:
  - { name: a, capacity_gib: -1, free_gib: ten, failure_domain: r1, colour: red }
  - { name: "", capacity_gib: 10, free_gib: 10, failure_domain: r1, replication: sync }
servers:
  - { name: h1, cpus: 99999999999, free_cpus: 1, memory_mib: 1, free_memory_mib: 1, live: "yes" }
  - { cpus: 1, free_cpus: 1, memory_mib: 1 }
connectivity: [h1]
extra: 1
"#;
    assert_eq!(
        errors(yaml),
        [
            "extra: unknown field",
            "storage[0].colour: unknown field",
            "storage[0].capacity_gib: -1 is out of range for a non-negative integer",
            "storage[0].free_gib: expected a non-negative integer, found a string",
            "storage[1].name: empty",
            "storage[1].replication: expected a list of strings, found a string",
            "servers[0].cpus: 99999999999 is out of range for u32",
            "servers[0].live: expected true or false, found a string",
            "servers[1].name: missing",
            "servers[1].free_memory_mib: missing",
            "connectivity: expected a mapping of server to storages, found a list",
        ]
    );
}

#[test]
fn semantic_errors_name_their_paths() {
    let yaml = r#"
storage:
  - { name: a, capacity_gib: 10, free_gib: 11, failure_domain: r1, replication: [s], peers: [a, zz] }
  - { name: a, capacity_gib: 10, free_gib: 10, failure_domain: r2, peers: [a] }
servers:
  - { name: h1, cpus: 4, free_cpus: 5, memory_mib: 10, free_memory_mib: 11 }
  - { name: h1, cpus: 4, free_cpus: 4, memory_mib: 10, free_memory_mib: 10 }
connectivity:
  h1: [a, nope, a]
  ghost: [a]
"#;
    assert_eq!(
        errors(yaml),
        [
            "storage[1].name: duplicate of storage[0].name",
            "storage[0].free_gib: 11 exceeds capacity_gib 10",
            "storage[0].peers: a storage cannot peer with itself",
            "storage[0].peers: unknown storage \"zz\"",
            "storage[1].peers: peers given but the storage has no replication tag",
            "storage[1].peers: a storage cannot peer with itself",
            "servers[0].free_cpus: 5 exceeds cpus 4",
            "servers[0].free_memory_mib: 11 exceeds memory_mib 10",
            "servers[1].name: duplicate of servers[0].name",
            "connectivity.ghost: unknown server \"ghost\"",
            "connectivity.h1[1]: unknown storage \"nope\"",
            "connectivity.h1[2]: duplicate of connectivity.h1[0]",
        ]
    );
}

#[test]
fn syntax_error_gives_the_line() {
    let err = Inventory::from_yaml_str("storage:\n  - { name: a\n").unwrap_err();
    assert!(
        matches!(err, LoadError::Syntax { line: Some(_), .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .starts_with("inventory is not valid YAML at line "),
        "{err}"
    );
}

#[test]
fn the_display_lists_every_problem() {
    let err = Inventory::from_yaml_str("storage: [{name: a}]").unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid inventory (3 problems)\n  storage[0].capacity_gib: missing\n  \
         storage[0].free_gib: missing\n  storage[0].failure_domain: missing"
    );
}

#[test]
fn json_body_gets_the_same_paths() {
    let body = serde_json::json!({
        "storage": [{ "name": "a", "capacity_gib": 5, "free_gib": 5 }],
        "servers": [],
    });
    let err = Inventory::from_json_value(&body).unwrap_err();
    assert_eq!(err.errors.len(), 1);
    assert_eq!(err.errors[0].path, "storage[0].failure_domain");
    assert_eq!(err.errors[0].problem, Problem::Missing);
}

#[test]
fn serde_round_trip_of_the_example() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/storage.yaml");
    let inv = Inventory::load_file(&path).unwrap();
    let json = serde_json::to_value(&inv).unwrap();
    assert_eq!(Inventory::from_json_value(&json).unwrap(), inv);
    // The derived Deserialize (what an axum Json extractor would use) agrees too.
    let direct: Inventory = serde_json::from_value(json).unwrap();
    assert_eq!(direct, inv);
}

#[test]
fn empty_document_is_an_empty_inventory() {
    assert_eq!(Inventory::from_yaml_str("").unwrap(), Inventory::default());
}
