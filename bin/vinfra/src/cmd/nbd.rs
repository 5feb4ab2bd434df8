//! `vinfra nbd serve`: a disk served through a block cache over NBD, on its own (like
//! `qemu-nbd`), for use outside the agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use cache::{BlockCache, BlockOrigin, BlockSize, CacheConfig, FileOrigin, OriginNbdSource};
use nbd::{NbdAddr, NbdUri, ReconnectPolicy, ServeConfig};

/// NBD commands.
#[derive(Debug, clap::Subcommand)]
pub enum NbdCmd {
    /// Serve a disk through a block cache over NBD until Ctrl-C.
    Serve(ServeArgs),
}

/// Options of `vinfra nbd serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The disk: a raw image FILE or an nbd://HOST:PORT/EXPORT (or nbd+unix://) URI.
    #[arg(long)]
    pub origin: String,
    /// Where the cache keeps its data and metadata (reused across restarts).
    #[arg(long)]
    pub cache_dir: PathBuf,
    /// 127.0.0.1:PORT or unix:PATH.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub listen: String,
    /// Export name.
    #[arg(long, default_value = "")]
    pub export: String,
    /// Cache capacity, e.g. 512M, 2G (default: the whole disk).
    #[arg(long)]
    pub cache_size: Option<String>,
    /// Threads running requests per connection. 1 runs them inline, in order (fastest
    /// when the cache is warm); more lets hits overtake a miss that waits on the origin.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
}

/// Parses `512M`, `2G`, `65536` (bytes; suffixes K/M/G/T are powers of 1024).
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => bail!("size {s:?}: unknown suffix {c:?} (use K, M, G or T)"),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("size {s:?} is not a number with an optional K/M/G/T suffix"))?;
    n.checked_mul(mult)
        .with_context(|| format!("size {s:?} is too large"))
}

fn parse_listen(s: &str) -> anyhow::Result<NbdAddr> {
    if let Some(p) = s.strip_prefix("unix:") {
        return Ok(NbdAddr::Unix(PathBuf::from(p)));
    }
    let a: SocketAddr = s
        .parse()
        .with_context(|| format!("--listen {s:?}: expected IP:PORT or unix:PATH"))?;
    Ok(NbdAddr::Tcp(a))
}

/// Runs a command.
pub async fn run(cmd: NbdCmd) -> anyhow::Result<()> {
    match cmd {
        NbdCmd::Serve(a) => serve(a).await,
    }
}

async fn serve(a: ServeArgs) -> anyhow::Result<()> {
    let listen = parse_listen(&a.listen)?;
    let cache_size = a.cache_size.as_deref().map(parse_size).transpose()?;
    let bs = BlockSize::DEFAULT;
    let origin: Arc<dyn BlockOrigin> =
        if a.origin.starts_with("nbd://") || a.origin.starts_with("nbd+unix://") {
            let uri: NbdUri = a
                .origin
                .parse()
                .with_context(|| format!("--origin {:?}", a.origin))?;
            let o = tokio::task::spawn_blocking(move || {
                OriginNbdSource::connect(uri.addr, &uri.export, ReconnectPolicy::default(), bs)
            })
            .await?
            .with_context(|| format!("cannot connect to the origin {}", a.origin))?;
            Arc::new(o)
        } else {
            let path = PathBuf::from(&a.origin);
            Arc::new(
                FileOrigin::open(&path, bs, None)
                    .with_context(|| format!("cannot open --origin {}", path.display()))?,
            )
        };
    let blocks = bs.blocks_for(origin.size()).max(1);
    let cap = match cache_size {
        Some(b) => (b / u64::from(bs.bytes())).clamp(1, blocks),
        None => blocks,
    };
    let cfg = CacheConfig::new(&a.cache_dir, cap);
    let cache = tokio::task::spawn_blocking(move || BlockCache::open(cfg, origin))
        .await?
        .with_context(|| format!("cannot open the cache in {}", a.cache_dir.display()))?;
    let (cache, report) = cache;
    tracing::info!(verified = report.verified, "cache opened");
    let cache = Arc::new(cache);
    // Heat and pattern learned from hits are saved only by checkpoints.
    let _checkpointer = cache.spawn_checkpointer(std::time::Duration::from_secs(5));
    let mut sc = ServeConfig::new(listen).export(a.export.clone(), cache.clone());
    sc.threads_per_connection = a.workers.max(1);
    let handle = nbd::serve(sc).context("cannot start the NBD server")?;
    println!(
        "serving {} as export {:?} on {}",
        a.origin,
        a.export,
        handle.local_addr()
    );
    crate::cmd::server::wait_for_signal().await?;
    handle.shutdown();
    tokio::task::spawn_blocking(move || cache.checkpoint())
        .await?
        .context("cannot write the final cache checkpoint")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536").unwrap(), 65536);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("2g").unwrap(), 2 << 30);
        assert!(parse_size("12Q")
            .unwrap_err()
            .to_string()
            .contains("unknown suffix"));
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T")
            .unwrap_err()
            .to_string()
            .contains("too large"));
    }
}
