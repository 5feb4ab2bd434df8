//! Loading descriptor files: a VNFD, or an NSD with the VNFDs it imports.

use std::path::{Path, PathBuf};

use serde_yaml_ng::Value;

use super::{check_limits, validate_nsd, validate_vnfd, DescriptorError, Nsd, Vnfd};

/// Why an NSD file and its imports could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        err: std::io::Error,
    },
    /// A descriptor is invalid; every error is listed.
    #[error("{path} is invalid:\n{}", list(.errors))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every error in it.
        errors: Vec<DescriptorError>,
    },
}

pub(super) fn list(errors: &[DescriptorError]) -> String {
    errors
        .iter()
        .map(|e| format!("  {e}"))
        .collect::<Vec<_>>()
        .join("\n")
}

pub(super) fn read(path: &Path) -> Result<String, LoadError> {
    std::fs::read_to_string(path).map_err(|err| LoadError::Read {
        path: path.to_owned(),
        err,
    })
}

/// Reads and validates a VNFD file (what `vinfra vnfd validate FILE` runs).
pub fn load_vnfd(path: &Path) -> Result<Vnfd, LoadError> {
    validate_vnfd(&read(path)?).map_err(|errors| LoadError::Invalid {
        path: path.to_owned(),
        errors,
    })
}

/// Reads an NSD file and the VNFDs it `imports` (paths relative to it), validating all.
pub fn load_nsd(path: &Path) -> Result<(Nsd, Vec<Vnfd>), LoadError> {
    let text = read(path)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    // Imports are read before validation so that descriptor_id references can be checked;
    // the limits apply before this first parse too.
    check_limits(&text).map_err(|e| LoadError::Invalid {
        path: path.to_owned(),
        errors: vec![e.into()],
    })?;
    let imports: Vec<String> = serde_yaml_ng::from_str::<Value>(&text)
        .ok()
        .and_then(|d| d.get("imports").and_then(Value::as_sequence).cloned())
        .unwrap_or_default()
        .iter()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect();
    let mut vnfds = Vec::new();
    for i in &imports {
        vnfds.push(load_vnfd(&dir.join(i))?);
    }
    let nsd = validate_nsd(&text, &vnfds).map_err(|errors| LoadError::Invalid {
        path: path.to_owned(),
        errors,
    })?;
    Ok((nsd, vnfds))
}
