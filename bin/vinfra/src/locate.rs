//! Where the CLI finds the API URL and token.
//!
//! Order: `--server`/`--token` flags, then `VINFRA_URL`/`VINFRA_TOKEN`, then the
//! files `vinfra up` writes into its data dir (`.vinfra/url`, `.vinfra/admin-token`),
//! looked up in the current directory and its parents — so `vinfra vm list` works
//! from anywhere inside the checkout where `vinfra up` runs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// Name of the data dir `vinfra up` creates in the current directory.
pub const DATA_DIR: &str = ".vinfra";
/// File in the data dir holding the API base URL.
pub const URL_FILE: &str = "url";
/// File in the data dir holding the admin token (mode 0600).
pub const ADMIN_TOKEN_FILE: &str = "admin-token";

/// The nearest `.vinfra` dir from `start` upwards.
pub fn find_data_dir(start: &Path) -> Option<PathBuf> {
    start
        .ancestors()
        .map(|d| d.join(DATA_DIR))
        .find(|d| d.join(URL_FILE).is_file())
}

/// Resolves the API URL and token for a CLI command.
pub fn endpoint(
    flag_url: Option<String>,
    flag_token: Option<String>,
) -> anyhow::Result<(String, String)> {
    let cwd = std::env::current_dir().context("cannot read the current directory")?;
    let dir = find_data_dir(&cwd);
    let url = match flag_url {
        Some(u) => u,
        None => match &dir {
            Some(d) => read_trimmed(&d.join(URL_FILE))?,
            None => bail!(
                "no vinfra server given: pass --server URL, set VINFRA_URL, or run `vinfra up` in this directory"
            ),
        },
    };
    let token = match flag_token {
        Some(t) => t,
        None => match &dir {
            Some(d) => read_trimmed(&d.join(ADMIN_TOKEN_FILE))?,
            None => bail!("no API token given: pass --token, set VINFRA_TOKEN, or run `vinfra up` in this directory"),
        },
    };
    Ok((url, token))
}

/// Reads a small text file and trims whitespace, naming the file on error.
pub fn read_trimmed(path: &Path) -> anyhow::Result<String> {
    let s =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let s = s.trim().to_owned();
    if s.is_empty() {
        bail!("{} is empty", path.display());
    }
    Ok(s)
}

/// Writes `contents` to `path` atomically with mode `mode` (tmp file, fsync, rename).
pub fn write_private(path: &Path, contents: &str, mode: u32) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename onto {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_data_dir_in_a_parent() {
        let root = tempfile::tempdir().unwrap();
        let dd = root.path().join(DATA_DIR);
        std::fs::create_dir_all(&dd).unwrap();
        std::fs::write(dd.join(URL_FILE), "http://127.0.0.1:1\n").unwrap();
        let deep = root.path().join("a/b");
        std::fs::create_dir_all(&deep).unwrap();
        assert_eq!(find_data_dir(&deep), Some(dd));
        assert_eq!(find_data_dir(Path::new("/proc/self")), None);
    }

    #[test]
    fn private_files_are_0600() {
        use std::os::unix::fs::PermissionsExt;
        let root = tempfile::tempdir().unwrap();
        let p = root.path().join("t");
        write_private(&p, "x", 0o600).unwrap();
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(read_trimmed(&p).unwrap(), "x");
    }
}
