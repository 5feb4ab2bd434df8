//! `--store` values: `redb:PATH` or `etcd:URL[,URL...]`, parsed into a
//! [`StoreSpec`] and opened as an `Arc<dyn Store>`.
//!
//! Parsing is strict and names what is wrong (the whole input, the kind, the
//! bad endpoint), because a typo here would otherwise surface as a connection
//! error far from its cause. etcd endpoints may be `http://HOST:PORT` or
//! `HOST:PORT` (normalised to `http://`); `https` is refused because the etcd
//! client is built without TLS.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use anyhow::Context as _;

/// The expected shapes, quoted in every error.
const EXPECTED: &str = "expected redb:PATH or etcd:URL[,URL...]";

/// Where the control plane keeps its state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    /// An embedded redb file (created if missing, with its parent directories).
    Redb {
        /// The database file.
        path: PathBuf,
    },
    /// An etcd cluster.
    Etcd {
        /// Client URLs, normalised to `http://HOST:PORT`.
        endpoints: Vec<String>,
    },
}

impl fmt::Display for StoreSpec {
    /// The spec in the form [`parse_store_spec`] reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreSpec::Redb { path } => write!(f, "redb:{}", path.display()),
            StoreSpec::Etcd { endpoints } => write!(f, "etcd:{}", endpoints.join(",")),
        }
    }
}

impl FromStr for StoreSpec {
    type Err = StoreSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_store_spec(s)
    }
}

/// A `--store` value that does not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreSpecError {
    input: String,
    problem: Problem,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Problem {
    MissingKind,
    UnknownKind(String),
    MissingPath,
    NoEndpoints,
    EmptyEndpoint,
    BadEndpoint { endpoint: String, why: String },
}

impl fmt::Display for StoreSpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let input = &self.input;
        match &self.problem {
            Problem::MissingKind => write!(f, "missing store kind in {input:?}: {EXPECTED}"),
            Problem::UnknownKind(kind) => {
                write!(f, "unknown store kind {kind:?} in {input:?}: {EXPECTED}")
            }
            Problem::MissingPath => write!(f, "missing path in {input:?}: expected redb:PATH"),
            Problem::NoEndpoints => {
                write!(
                    f,
                    "missing endpoints in {input:?}: expected etcd:URL[,URL...]"
                )
            }
            Problem::EmptyEndpoint => {
                write!(f, "empty endpoint in {input:?}: expected etcd:URL[,URL...]")
            }
            Problem::BadEndpoint { endpoint, why } => {
                write!(f, "invalid etcd endpoint {endpoint:?} in {input:?}: {why}")
            }
        }
    }
}

impl std::error::Error for StoreSpecError {}

/// Parses `redb:PATH` or `etcd:URL[,URL...]`.
pub fn parse_store_spec(s: &str) -> Result<StoreSpec, StoreSpecError> {
    let err = |problem| StoreSpecError {
        input: s.to_owned(),
        problem,
    };
    let Some((kind, rest)) = s.split_once(':') else {
        return Err(err(Problem::MissingKind));
    };
    match kind {
        "redb" => {
            if rest.is_empty() {
                return Err(err(Problem::MissingPath));
            }
            Ok(StoreSpec::Redb {
                path: PathBuf::from(rest),
            })
        }
        "etcd" => {
            if rest.trim().is_empty() {
                return Err(err(Problem::NoEndpoints));
            }
            let endpoints = rest
                .split(',')
                .map(|e| match e.trim() {
                    "" => Err(err(Problem::EmptyEndpoint)),
                    e => normalize_endpoint(e).map_err(|why| {
                        err(Problem::BadEndpoint {
                            endpoint: e.to_owned(),
                            why,
                        })
                    }),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(StoreSpec::Etcd { endpoints })
        }
        "" => Err(err(Problem::MissingKind)),
        other => Err(err(Problem::UnknownKind(other.to_owned()))),
    }
}

/// `http://HOST:PORT` from `http://HOST:PORT[/]` or `HOST:PORT`, or why not.
fn normalize_endpoint(e: &str) -> Result<String, String> {
    const USE: &str = "use http://HOST:PORT";
    let authority = match e.split_once("://") {
        None => e,
        Some(("http", rest)) => rest,
        Some(("https", _)) => {
            return Err(format!("https is not supported (built without TLS); {USE}"))
        }
        Some((scheme, _)) => return Err(format!("unsupported scheme {scheme:?}; {USE}")),
    };
    let authority = authority.strip_suffix('/').unwrap_or(authority);
    if authority.contains('/') {
        return Err(format!("unexpected path; {USE}"));
    }
    let Some((host, port)) = authority.rsplit_once(':') else {
        return Err(format!("missing port; {USE}"));
    };
    // A bare IPv6 address without brackets splits inside the address.
    if host.is_empty() || (host.contains(':') && !(host.starts_with('[') && host.ends_with(']'))) {
        return Err(format!(
            "missing or malformed host; {USE} (IPv6: http://[ADDR]:PORT)"
        ));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 => Ok(format!("http://{host}:{p}")),
        _ => Err(format!("port {port:?} is not a number from 1 to 65535")),
    }
}

/// Opens the store `spec` names: creates the redb file (and its parent
/// directories) if missing, or connects to etcd and checks that it answers.
pub async fn open_store(spec: &StoreSpec) -> anyhow::Result<Arc<dyn store::Store>> {
    let store: Arc<dyn store::Store> = match spec {
        StoreSpec::Redb { path } => {
            if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("cannot create directory {}", parent.display()))?;
            }
            let path = path.clone();
            // Opening may repair the file after a crash: off the async workers.
            let store = tokio::task::spawn_blocking(move || store_redb::RedbStore::open(&path))
                .await
                .context("redb open task failed")??;
            Arc::new(store)
        }
        StoreSpec::Etcd { endpoints } => {
            Arc::new(store_etcd::EtcdStore::connect(endpoints, None).await?)
        }
    };
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(s: &str) -> String {
        parse_store_spec(s).unwrap_err().to_string()
    }

    #[test]
    fn parses_redb() {
        assert_eq!(
            parse_store_spec("redb:./.vinfra/state.redb").unwrap(),
            StoreSpec::Redb {
                path: "./.vinfra/state.redb".into()
            }
        );
        // Only the first ':' separates the kind.
        assert_eq!(
            parse_store_spec("redb:/data/a:b.redb").unwrap(),
            StoreSpec::Redb {
                path: "/data/a:b.redb".into()
            }
        );
    }

    #[test]
    fn parses_etcd() {
        let spec = parse_store_spec("etcd:http://10.0.0.1:2379, 10.0.0.2:2379,http://[::1]:2379/")
            .unwrap();
        assert_eq!(
            spec,
            StoreSpec::Etcd {
                endpoints: vec![
                    "http://10.0.0.1:2379".into(),
                    "http://10.0.0.2:2379".into(),
                    "http://[::1]:2379".into(),
                ]
            }
        );
        assert_eq!(
            spec.to_string(),
            "etcd:http://10.0.0.1:2379,http://10.0.0.2:2379,http://[::1]:2379"
        );
        assert_eq!(spec.to_string().parse::<StoreSpec>().unwrap(), spec);
        assert_eq!(
            parse_store_spec("etcd:localhost:2379").unwrap(),
            StoreSpec::Etcd {
                endpoints: vec!["http://localhost:2379".into()]
            }
        );
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(
            err("foo:bar"),
            r#"unknown store kind "foo" in "foo:bar": expected redb:PATH or etcd:URL[,URL...]"#
        );
        assert_eq!(
            err("state.redb"),
            r#"missing store kind in "state.redb": expected redb:PATH or etcd:URL[,URL...]"#
        );
        assert_eq!(
            err(":x"),
            r#"missing store kind in ":x": expected redb:PATH or etcd:URL[,URL...]"#
        );
        assert_eq!(
            err("redb:"),
            r#"missing path in "redb:": expected redb:PATH"#
        );
        assert_eq!(
            err("etcd:"),
            r#"missing endpoints in "etcd:": expected etcd:URL[,URL...]"#
        );
        assert_eq!(
            err("etcd:a:1,,b:2"),
            r#"empty endpoint in "etcd:a:1,,b:2": expected etcd:URL[,URL...]"#
        );
        assert_eq!(
            err("etcd:https://h:2379"),
            r#"invalid etcd endpoint "https://h:2379" in "etcd:https://h:2379": https is not supported (built without TLS); use http://HOST:PORT"#
        );
        assert!(err("etcd:ftp://h:1").contains(r#"unsupported scheme "ftp""#));
        assert!(err("etcd:http://h").contains(r#""http://h" in "etcd:http://h": missing port"#));
        assert!(err("etcd:h:99999").contains(r#"port "99999" is not a number from 1 to 65535"#));
        assert!(err("etcd:h:0").contains("is not a number from 1 to 65535"));
        assert!(err("etcd:h:x").contains(r#"port "x""#));
        assert!(err("etcd::2379").contains("missing or malformed host"));
        assert!(err("etcd:::1:2379").contains("malformed host"));
        assert!(err("etcd:http://h:1/v3").contains("unexpected path"));
        assert!(err("REDB:x").contains(r#"unknown store kind "REDB""#));
    }

    #[tokio::test]
    async fn opens_redb_creating_directories() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/state.redb");
        let spec = parse_store_spec(&format!("redb:{}", path.display())).unwrap();
        let store = open_store(&spec).await.unwrap();
        store.put("/k", "v".into()).await.unwrap();
        drop(store);
        assert!(path.is_file());
        let store = open_store(&spec).await.unwrap();
        assert!(store.get("/k").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn open_errors_name_the_cause() {
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("notes.txt");
        std::fs::write(&bad, "not a database").unwrap();
        let spec = StoreSpec::Redb { path: bad.clone() };
        let e = format!(
            "{:#}",
            open_store(&spec).await.err().expect("open must fail")
        );
        assert!(e.contains(&bad.display().to_string()), "{e}");
        assert!(e.contains("not a redb database"), "{e}");

        let port = test_utils::free_tcp_port();
        let spec = parse_store_spec(&format!("etcd:127.0.0.1:{port}")).unwrap();
        let e = format!(
            "{:#}",
            open_store(&spec).await.err().expect("open must fail")
        );
        assert!(e.contains(&format!("http://127.0.0.1:{port}")), "{e}");
    }

    #[tokio::test]
    async fn opens_etcd() {
        let etcd = test_utils::EtcdFixture::spawn().await.unwrap();
        let spec = parse_store_spec(&format!("etcd:{}", etcd.endpoint())).unwrap();
        let store = open_store(&spec).await.unwrap();
        let rev = store.put("/k", "v".into()).await.unwrap();
        assert_eq!(store.get("/k").await.unwrap().unwrap().mod_revision, rev);
    }
}
