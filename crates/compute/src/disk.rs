//! VM disks: a VM's own copy of its image's disk template. Serving it is not ours: the
//! node agent exports it through its block cache and the `nbd` crate's server.

use std::path::{Path, PathBuf};
use std::process::Stdio;

/// Errors of the disk helpers.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DiskError {
    /// A file operation failed.
    #[error("cannot {action} {path}")]
    Io {
        /// What we tried.
        action: &'static str,
        /// On what.
        path: PathBuf,
        /// The cause.
        #[source]
        err: std::io::Error,
    },
    /// Bad arguments.
    #[error("invalid disk arguments: {0}")]
    Invalid(String),
}

/// Creates a VM's own disk from a template, unless it exists already (a VM's disk holds its
/// data: it is never overwritten). Returns whether it was created. The copy is sparse and
/// reflinked where the filesystem allows, and appears under `dest` only when complete.
pub async fn prepare_vm_disk(template: &Path, dest: &Path) -> Result<bool, DiskError> {
    if dest.exists() {
        return Ok(false);
    }
    if !template.is_file() {
        return Err(DiskError::Invalid(format!(
            "template {} is not a file",
            template.display()
        )));
    }
    let mut tmp = dest.as_os_str().to_owned();
    tmp.push(format!(".tmp.{}", std::process::id()));
    let tmp = PathBuf::from(tmp);
    let cp = tokio::process::Command::new("cp")
        .args(["--reflink=auto", "--sparse=always"])
        .arg(template)
        .arg(&tmp)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    let copied = match cp {
        Ok(st) if st.success() => Ok(()),
        // No GNU cp: a plain copy is correct, just not sparse.
        _ => tokio::fs::copy(template, &tmp).await.map(drop),
    };
    let res = match copied {
        Ok(()) => tokio::fs::rename(&tmp, dest).await,
        Err(e) => Err(e),
    };
    res.map_err(|err| {
        let _ = std::fs::remove_file(&tmp);
        DiskError::Io {
            action: "copy disk template to",
            path: dest.to_owned(),
            err,
        }
    })?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn prepare_copies_once_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("t.img");
        std::fs::write(&t, b"BLK000000\n").unwrap();
        let d = dir.path().join("vm.img");
        assert!(prepare_vm_disk(&t, &d).await.unwrap());
        assert_eq!(std::fs::read(&d).unwrap(), b"BLK000000\n");
        std::fs::write(&d, b"guest data").unwrap();
        assert!(!prepare_vm_disk(&t, &d).await.unwrap());
        assert_eq!(std::fs::read(&d).unwrap(), b"guest data");
        let e = prepare_vm_disk(&dir.path().join("nope"), &dir.path().join("x"))
            .await
            .unwrap_err();
        assert!(matches!(e, DiskError::Invalid(_)));
    }
}
