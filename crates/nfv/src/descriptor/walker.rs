//! Walking the YAML tree: the error collector with its typed accessors, and the checks both
//! descriptor kinds share (top-level keys, names, sizes, node templates, requirements).

use std::collections::BTreeMap;
use std::str::FromStr;

use serde_yaml_ng::Value;

use super::{check_limits, DescriptorError, Ipv4Cidr, LayerProtocol, LimitError};

/// Collects errors while walking the YAML tree.
#[derive(Default)]
pub(super) struct Walker {
    pub(super) errors: Vec<DescriptorError>,
}

pub(super) fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

pub(super) fn kind_of(v: &Value) -> &'static str {
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
    pub(super) fn err(&mut self, path: &str, message: impl Into<String>) {
        self.errors.push(DescriptorError {
            path: path.to_owned(),
            message: message.into(),
        });
    }

    pub(super) fn finish<T>(self, value: T) -> Result<T, Vec<DescriptorError>> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            Err(self.errors)
        }
    }

    /// `parent[key]` when it must be present.
    pub(super) fn required<'a>(
        &mut self,
        parent: &'a Value,
        key: &str,
        path: &str,
    ) -> Option<&'a Value> {
        match parent.get(key) {
            Some(Value::Null) | None => {
                self.err(&join(path, key), "required");
                None
            }
            Some(v) => Some(v),
        }
    }

    pub(super) fn string(&mut self, v: &Value, path: &str) -> Option<String> {
        match v {
            Value::String(s) if !s.trim().is_empty() => Some(s.clone()),
            Value::String(_) => {
                self.err(path, "must not be empty");
                None
            }
            // YAML reads `version: 1.0` as a number; accept it as the text it was.
            Value::Number(n) => Some(n.to_string()),
            other => {
                self.err(path, format!("expected a string, found {}", kind_of(other)));
                None
            }
        }
    }

    pub(super) fn req_string(&mut self, parent: &Value, key: &str, path: &str) -> Option<String> {
        let v = self.required(parent, key, path)?;
        self.string(v, &join(path, key))
    }

    pub(super) fn opt_string(&mut self, parent: &Value, key: &str, path: &str) -> Option<String> {
        match parent.get(key) {
            None | Some(Value::Null) => None,
            Some(v) => self.string(v, &join(path, key)),
        }
    }

    pub(super) fn uint(&mut self, v: &Value, path: &str, min: u64) -> Option<u64> {
        match v.as_u64() {
            Some(n) if n >= min => Some(n),
            Some(n) => {
                self.err(path, format!("must be at least {min}, found {n}"));
                None
            }
            None => {
                self.err(path, format!("expected an integer >= {min}"));
                None
            }
        }
    }

    pub(super) fn mapping<'a>(
        &mut self,
        v: &'a Value,
        path: &str,
    ) -> Option<&'a serde_yaml_ng::Mapping> {
        match v.as_mapping() {
            Some(m) => Some(m),
            None => {
                self.err(path, format!("expected a mapping, found {}", kind_of(v)));
                None
            }
        }
    }

    pub(super) fn sequence<'a>(&mut self, v: &'a Value, path: &str) -> Option<&'a Vec<Value>> {
        match v.as_sequence() {
            Some(s) => Some(s),
            None => {
                self.err(path, format!("expected a list, found {}", kind_of(v)));
                None
            }
        }
    }

    pub(super) fn size_mib(&mut self, v: &Value, path: &str) -> Option<u64> {
        let Some(s) = v.as_str() else {
            self.err(path, "expected a size such as '512 MiB'");
            return None;
        };
        match parse_size_bytes(s) {
            Some(b) if b >= MIB => Some(b / MIB),
            Some(_) => {
                self.err(path, format!("size '{s}' is below 1 MiB"));
                None
            }
            None => {
                self.err(
                    path,
                    format!("bad size '{s}' (want e.g. '512 MiB' or '1 GiB')"),
                );
                None
            }
        }
    }

    pub(super) fn layer_protocols(&mut self, parent: &Value, path: &str) -> Vec<LayerProtocol> {
        let lp_path = join(path, "layer_protocols");
        let Some(v) = self.required(parent, "layer_protocols", path) else {
            return Vec::new();
        };
        let Some(seq) = self.sequence(v, &lp_path) else {
            return Vec::new();
        };
        if seq.is_empty() {
            self.err(&lp_path, "must not be empty");
        }
        let mut out = Vec::new();
        for (i, item) in seq.iter().enumerate() {
            let p = format!("{lp_path}[{i}]");
            match item.as_str().map(LayerProtocol::from_str) {
                Some(Ok(lp)) => out.push(lp),
                Some(Err(())) => self.err(
                    &p,
                    format!(
                        "unknown layer protocol '{}' (ethernet, mpls, odu2, ipv4, ipv6, pseudo_wire)",
                        item.as_str().unwrap_or_default()
                    ),
                ),
                None => self.err(&p, "expected a string"),
            }
        }
        out
    }

    /// `vl_profile.virtual_link_protocol_data[0].l3_protocol_data.cidr`, the SOL001 spot.
    pub(super) fn vl_cidr(&mut self, props: &Value, path: &str) -> Option<Ipv4Cidr> {
        let vp = self.required(props, "vl_profile", path)?;
        let vp_path = join(path, "vl_profile");
        let data = self.required(vp, "virtual_link_protocol_data", &vp_path)?;
        let data_path = join(&vp_path, "virtual_link_protocol_data");
        let seq = self.sequence(data, &data_path)?;
        let Some(first) = seq.first() else {
            self.err(&data_path, "must not be empty");
            return None;
        };
        let p0 = format!("{data_path}[0]");
        let l3 = self.required(first, "l3_protocol_data", &p0)?;
        let l3_path = join(&p0, "l3_protocol_data");
        if let Some(ver) = self.opt_string(l3, "ip_version", &l3_path) {
            if ver != "ipv4" {
                self.err(
                    &join(&l3_path, "ip_version"),
                    format!("only ipv4 is supported, found '{ver}'"),
                );
            }
        }
        let cidr = self.req_string(l3, "cidr", &l3_path)?;
        match cidr.parse::<Ipv4Cidr>() {
            Ok(c) => Some(c),
            Err(e) => {
                self.err(&join(&l3_path, "cidr"), e.to_string());
                None
            }
        }
    }

    pub(super) fn header<'a>(&mut self, doc: &'a Value) -> (Option<String>, Option<&'a Value>) {
        if let Some(v) = self.opt_string(doc, "tosca_definitions_version", "") {
            if !v.starts_with("tosca_simple_yaml_1_") {
                self.err(
                    "tosca_definitions_version",
                    format!("unsupported '{v}' (want tosca_simple_yaml_1_x)"),
                );
            }
        } else if doc.get("tosca_definitions_version").is_none() {
            self.err("tosca_definitions_version", "required");
        }
        if let Some(m) = doc.as_mapping() {
            for k in m.keys() {
                let k = k.as_str().unwrap_or("?");
                if !TOP_KEYS.contains(&k) {
                    self.err(k, "unknown key");
                }
            }
        }
        let id = self
            .required(doc, "metadata", "")
            .and_then(|md| self.req_string(md, "descriptor_id", "metadata"));
        let templates = self
            .required(doc, "topology_template", "")
            .and_then(|tt| self.required(tt, "node_templates", "topology_template"));
        (id, templates)
    }
}

pub(super) const TOP_KEYS: &[&str] = &[
    "tosca_definitions_version",
    "description",
    "metadata",
    "imports",
    "node_types",
    "data_types",
    "topology_template",
];

pub(super) const MIB: u64 = 1 << 20;

/// Parses a TOSCA `scalar-unit.size` ("512 MiB", "1 GB") to bytes.
pub(super) fn parse_size_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult: u64 = match unit.trim() {
        "B" => 1,
        "kB" | "KB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        "TB" => 1_000_000_000_000,
        "TiB" => 1 << 40,
        _ => return None,
    };
    n.checked_mul(mult)
}

pub(super) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 40
        && s.starts_with(|c: char| c.is_ascii_lowercase())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

impl From<LimitError> for DescriptorError {
    fn from(e: LimitError) -> Self {
        DescriptorError {
            path: "descriptor".into(),
            message: e.to_string(),
        }
    }
}

/// Parses `text` after [`check_limits`]: a document over the limits is never parsed.
pub(super) fn parse_doc(text: &str) -> Result<Value, Vec<DescriptorError>> {
    check_limits(text).map_err(|e| vec![e.into()])?;
    match serde_yaml_ng::from_str::<Value>(text) {
        Ok(v @ Value::Mapping(_)) => Ok(v),
        Ok(other) => Err(vec![DescriptorError {
            path: "(document)".into(),
            message: format!("expected a mapping, found {}", kind_of(&other)),
        }]),
        Err(e) => Err(vec![DescriptorError {
            path: "(document)".into(),
            message: format!("invalid YAML: {e}"),
        }]),
    }
}

/// Named node templates with their type, checking names and types.
pub(super) fn templates<'a>(
    w: &mut Walker,
    templates: &'a Value,
    known: &[&'static str],
) -> Vec<(String, &'static str, &'a Value)> {
    let base = "topology_template.node_templates";
    let Some(map) = w.mapping(templates, base) else {
        return Vec::new();
    };
    if map.is_empty() {
        w.err(base, "must not be empty");
    }
    let mut out = Vec::new();
    for (k, v) in map {
        let Some(name) = k.as_str() else {
            w.err(base, "node template names must be strings");
            continue;
        };
        let path = join(base, name);
        if !valid_name(name) {
            w.err(
                &path,
                "invalid name (start with a-z; then a-z, 0-9, '_' or '-'; at most 40)",
            );
        }
        let Some(ty) = w.req_string(v, "type", &path) else {
            continue;
        };
        match known.iter().find(|k| **k == ty) {
            Some(k) => out.push((name.to_owned(), *k, v)),
            None => w.err(
                &join(&path, "type"),
                format!("unknown node type '{ty}' (known: {})", known.join(", ")),
            ),
        }
    }
    out
}

/// One `requirements` list: `[{name: target}, ...]`, returned with each item's path.
pub(super) fn requirements(
    w: &mut Walker,
    node: &Value,
    path: &str,
) -> Vec<(String, String, String)> {
    let Some(v) = node.get("requirements") else {
        return Vec::new();
    };
    let rpath = join(path, "requirements");
    let Some(seq) = w.sequence(v, &rpath) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, item) in seq.iter().enumerate() {
        let ipath = format!("{rpath}[{i}]");
        match item.as_mapping() {
            Some(m) if m.len() == 1 => {
                for (k, target) in m {
                    let Some(k) = k.as_str() else {
                        w.err(&ipath, "requirement name must be a string");
                        continue;
                    };
                    let tpath = join(&ipath, k);
                    if let Some(t) = w.string(target, &tpath) {
                        out.push((k.to_owned(), t, tpath));
                    }
                }
            }
            _ => w.err(&ipath, "expected one 'name: target' pair"),
        }
    }
    out
}

pub(super) fn check_ref(
    w: &mut Walker,
    types: &BTreeMap<String, &'static str>,
    target: &str,
    want: &str,
    path: &str,
) -> bool {
    match types.get(target) {
        None => {
            w.err(path, format!("unknown node '{target}'"));
            false
        }
        Some(t) if *t != want => {
            w.err(path, format!("'{target}' is a {t}, not a {want}"));
            false
        }
        Some(_) => true,
    }
}
