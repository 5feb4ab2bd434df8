//! The API crate's handlers only authenticate, parse, call the control layer and map
//! its error: no route file knows a store key, runs a read-modify-write or spawns a task.

#[test]
fn route_handlers_hold_no_store_keys_cas_loops_or_spawned_tasks() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/routes");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for needle in ["keys::", ".cas(", ".txn(", "tokio::spawn", "CAS_ATTEMPTS"] {
            assert!(
                !text.contains(needle),
                "{} uses {needle}: that belongs in the control layer",
                path.display()
            );
        }
        checked += 1;
    }
    assert!(
        checked >= 15,
        "only {checked} route files found in {}",
        dir.display()
    );
}
