//! Loading an [`Inventory`] from YAML (the operator's file) or JSON (the API body).
//!
//! serde alone reports the first problem, without the path of a missing field. The
//! document is therefore parsed into a generic value first and walked by hand, so that
//! every problem is reported with its exact path (`storage[3].failure_domain: missing`);
//! the typed inventory is then checked by [`Inventory::validate`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_yaml_ng::{Mapping, Value};

use crate::model::{
    FailureDomain, FieldError, Inventory, InventoryError, Problem, ReplicationTag, ServerName,
    ServerResource, StorageName, StorageResource,
};

/// Why an inventory could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be read.
    #[error("cannot read inventory {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        err: std::io::Error,
    },
    /// Not YAML (or JSON) at all.
    #[error("inventory is not valid YAML{}", location(*.line, *.column))]
    Syntax {
        /// 1-based line of the problem, when known.
        line: Option<usize>,
        /// 1-based column of the problem, when known.
        column: Option<usize>,
        /// The parser's error.
        #[source]
        err: serde_yaml_ng::Error,
    },
    /// Well-formed but wrong: every problem with its path.
    #[error(transparent)]
    Invalid(#[from] InventoryError),
}

fn location(line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!(" at line {l} column {c}"),
        (Some(l), None) => format!(" at line {l}"),
        _ => String::new(),
    }
}

impl Inventory {
    /// Reads and validates an inventory file (YAML, of which JSON is a subset).
    pub fn load_file(path: &Path) -> Result<Inventory, LoadError> {
        let text = std::fs::read_to_string(path).map_err(|err| LoadError::Read {
            path: path.to_owned(),
            err,
        })?;
        Inventory::from_yaml_str(&text)
    }

    /// Parses and validates an inventory from YAML (or JSON) text.
    ///
    /// ```
    /// let inv = sched::Inventory::from_yaml_str("storage: []\nservers: []\n").unwrap();
    /// assert!(inv.storage.is_empty());
    /// let err = sched::Inventory::from_yaml_str("storage: [{name: a}]").unwrap_err();
    /// assert!(err.to_string().contains("storage[0].capacity_gib: missing"));
    /// ```
    pub fn from_yaml_str(text: &str) -> Result<Inventory, LoadError> {
        let value: Value = serde_yaml_ng::from_str(text).map_err(|err| {
            let loc = err.location();
            LoadError::Syntax {
                line: loc.as_ref().map(|l| l.line()),
                column: loc.as_ref().map(|l| l.column()),
                err,
            }
        })?;
        Ok(Inventory::from_value(&value)?)
    }

    /// Validates an inventory that arrived as JSON (the API body), with the same paths.
    pub fn from_json_value(json: &serde_json::Value) -> Result<Inventory, InventoryError> {
        // Every JSON value has a YAML value; the conversion cannot fail for the
        // types serde_json produces, but it is reported rather than assumed.
        let value = serde_yaml_ng::to_value(json).map_err(|_| InventoryError {
            errors: vec![FieldError {
                path: "$".to_owned(),
                problem: Problem::WrongType {
                    expected: "a JSON document",
                    found: "something else",
                },
            }],
        })?;
        Inventory::from_value(&value)
    }

    fn from_value(value: &Value) -> Result<Inventory, InventoryError> {
        let mut w = Walker::default();
        let inv = w.inventory(value);
        if !w.errors.is_empty() {
            return Err(InventoryError { errors: w.errors });
        }
        inv.validate()?;
        Ok(inv)
    }
}

#[derive(Default)]
struct Walker {
    errors: Vec<FieldError>,
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

impl Walker {
    fn err(&mut self, path: String, problem: Problem) {
        self.errors.push(FieldError { path, problem });
    }

    fn wrong(&mut self, path: String, expected: &'static str, v: &Value) {
        let found = kind(v);
        self.err(path, Problem::WrongType { expected, found });
    }

    fn mapping<'v>(&mut self, v: &'v Value, path: &str, allowed: &[&str]) -> Option<&'v Mapping> {
        let Value::Mapping(m) = v else {
            self.wrong(path.to_owned(), "a mapping", v);
            return None;
        };
        for (k, _) in m {
            match k.as_str() {
                Some(k) if allowed.contains(&k) => {}
                Some(k) => self.err(join(path, k), Problem::UnknownField),
                None => self.wrong(path.to_owned(), "string keys", k),
            }
        }
        Some(m)
    }

    fn required<'v>(&mut self, m: &'v Mapping, path: &str, key: &str) -> Option<&'v Value> {
        let v = m.get(key);
        if v.is_none() {
            self.err(join(path, key), Problem::Missing);
        }
        v
    }

    fn string(&mut self, v: &Value, path: String) -> Option<String> {
        match v {
            Value::String(s) if s.is_empty() => {
                self.err(path, Problem::Empty);
                None
            }
            Value::String(s) => Some(s.clone()),
            _ => {
                self.wrong(path, "a string", v);
                None
            }
        }
    }

    fn u64(&mut self, v: &Value, path: String) -> Option<u64> {
        match v {
            Value::Number(n) => match n.as_u64() {
                Some(n) => Some(n),
                None => {
                    let value = n.to_string();
                    let expected = "a non-negative integer";
                    self.err(path, Problem::OutOfRange { value, expected });
                    None
                }
            },
            _ => {
                self.wrong(path, "a non-negative integer", v);
                None
            }
        }
    }

    fn u32(&mut self, v: &Value, path: String) -> Option<u32> {
        let n = self.u64(v, path.clone())?;
        match u32::try_from(n) {
            Ok(n) => Some(n),
            Err(_) => {
                let value = n.to_string();
                self.err(
                    path,
                    Problem::OutOfRange {
                        value,
                        expected: "u32",
                    },
                );
                None
            }
        }
    }

    fn bool(&mut self, v: &Value, path: String) -> Option<bool> {
        match v {
            Value::Bool(b) => Some(*b),
            _ => {
                self.wrong(path, "true or false", v);
                None
            }
        }
    }

    fn strings(&mut self, v: &Value, path: &str) -> Vec<String> {
        let Value::Sequence(items) = v else {
            self.wrong(path.to_owned(), "a list of strings", v);
            return Vec::new();
        };
        items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| self.string(item, format!("{path}[{i}]")))
            .collect()
    }

    fn req_string(&mut self, m: &Mapping, path: &str, key: &str) -> Option<String> {
        let v = self.required(m, path, key)?;
        self.string(v, join(path, key))
    }

    fn req_u64(&mut self, m: &Mapping, path: &str, key: &str) -> Option<u64> {
        let v = self.required(m, path, key)?;
        self.u64(v, join(path, key))
    }

    fn req_u32(&mut self, m: &Mapping, path: &str, key: &str) -> Option<u32> {
        let v = self.required(m, path, key)?;
        self.u32(v, join(path, key))
    }

    fn inventory(&mut self, v: &Value) -> Inventory {
        let mut inv = Inventory::default();
        // An empty document is an empty inventory, not an error.
        if matches!(v, Value::Null) {
            return inv;
        }
        let Some(m) = self.mapping(v, "$", &["storage", "servers", "connectivity"]) else {
            return inv;
        };
        if let Some(list) = m.get("storage") {
            inv.storage = self.list(list, "storage", Walker::storage);
        }
        if let Some(list) = m.get("servers") {
            inv.servers = self.list(list, "servers", Walker::server);
        }
        if let Some(c) = m.get("connectivity") {
            inv.connectivity = self.connectivity(c);
        }
        inv
    }

    fn list<T>(
        &mut self,
        v: &Value,
        path: &str,
        item: fn(&mut Walker, &Value, &str) -> Option<T>,
    ) -> Vec<T> {
        match v {
            Value::Null => Vec::new(),
            Value::Sequence(items) => items
                .iter()
                .enumerate()
                .filter_map(|(i, v)| item(self, v, &format!("{path}[{i}]")))
                .collect(),
            _ => {
                self.wrong(path.to_owned(), "a list", v);
                Vec::new()
            }
        }
    }

    fn storage(&mut self, v: &Value, path: &str) -> Option<StorageResource> {
        const FIELDS: &[&str] = &[
            "name",
            "capacity_gib",
            "free_gib",
            "replication",
            "peers",
            "failure_domain",
        ];
        let m = self.mapping(v, path, FIELDS)?;
        // Every field is read before any `?` so that one item reports all its problems.
        let name = self.req_string(m, path, "name");
        let capacity_gib = self.req_u64(m, path, "capacity_gib");
        let free_gib = self.req_u64(m, path, "free_gib");
        let replication = match m.get("replication") {
            Some(v) => self.strings(v, &join(path, "replication")),
            None => Vec::new(),
        };
        let peers = match m.get("peers") {
            Some(v) => self.strings(v, &join(path, "peers")),
            None => Vec::new(),
        };
        let failure_domain = self.req_string(m, path, "failure_domain");
        Some(StorageResource {
            name: StorageName(name?),
            capacity_gib: capacity_gib?,
            free_gib: free_gib?,
            replication: replication
                .into_iter()
                .map(ReplicationTag)
                .collect::<BTreeSet<_>>(),
            peers: peers.into_iter().map(StorageName).collect(),
            failure_domain: FailureDomain(failure_domain?),
        })
    }

    fn server(&mut self, v: &Value, path: &str) -> Option<ServerResource> {
        const FIELDS: &[&str] = &[
            "name",
            "cpus",
            "free_cpus",
            "memory_mib",
            "free_memory_mib",
            "live",
            "in_maintenance",
            "failure_domain",
        ];
        let m = self.mapping(v, path, FIELDS)?;
        let name = self.req_string(m, path, "name");
        let cpus = self.req_u32(m, path, "cpus");
        let free_cpus = self.req_u32(m, path, "free_cpus");
        let memory_mib = self.req_u64(m, path, "memory_mib");
        let free_memory_mib = self.req_u64(m, path, "free_memory_mib");
        let live = match m.get("live") {
            Some(v) => self.bool(v, join(path, "live")),
            None => Some(true),
        };
        let in_maintenance = match m.get("in_maintenance") {
            Some(v) => self.bool(v, join(path, "in_maintenance")),
            None => Some(false),
        };
        let failure_domain = match m.get("failure_domain") {
            None | Some(Value::Null) => Some(None),
            Some(v) => self
                .string(v, join(path, "failure_domain"))
                .map(|d| Some(FailureDomain(d))),
        };
        Some(ServerResource {
            name: ServerName(name?),
            cpus: cpus?,
            free_cpus: free_cpus?,
            memory_mib: memory_mib?,
            free_memory_mib: free_memory_mib?,
            live: live?,
            in_maintenance: in_maintenance?,
            failure_domain: failure_domain?,
        })
    }

    fn connectivity(&mut self, v: &Value) -> BTreeMap<ServerName, Vec<StorageName>> {
        let mut out = BTreeMap::new();
        let m = match v {
            Value::Null => return out,
            Value::Mapping(m) => m,
            _ => {
                self.wrong(
                    "connectivity".to_owned(),
                    "a mapping of server to storages",
                    v,
                );
                return out;
            }
        };
        for (k, list) in m {
            let Some(server) = k.as_str() else {
                self.wrong("connectivity".to_owned(), "server names as keys", k);
                continue;
            };
            let path = join("connectivity", server);
            let storages = self.strings(list, &path);
            out.insert(
                ServerName::new(server),
                storages.into_iter().map(StorageName).collect(),
            );
        }
        out
    }
}

fn join(path: &str, key: &str) -> String {
    if path == "$" {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}
