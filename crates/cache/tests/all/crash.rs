//! A real crash: a child process runs reads, partial writes, evictions and checkpoints on
//! a cache until it is killed with SIGKILL; the reopened cache must serve only blocks
//! equal to the origin's.

use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache::{BlockIdx, BlockSize, CacheConfig, FileOrigin};

use crate::BS;

const BLOCKS: u64 = 128;
const CHILD_ENV: &str = "CACHE_CRASH_CHILD_DIR";

fn open(dir: &std::path::Path) -> (Arc<cache::BlockCache>, cache::OpenReport) {
    let bs = BlockSize::new(BS).unwrap();
    let o = Arc::new(FileOrigin::open(&dir.join("disk.img"), bs, None).unwrap());
    let mut cfg = CacheConfig::new(dir.join("c"), 32);
    cfg.block_size = bs;
    cfg.checkpoint_every = 50; // checkpoints happen often, so the kill lands around them too
    let (c, r) = cache::BlockCache::open(cfg, o).unwrap();
    (Arc::new(c), r)
}

/// The child's body, started by the two tests below through [`spawn_child`].
/// Ignored so that a normal run neither runs it nor counts it as a pass.
#[test]
#[ignore = "helper process of the crash tests in this module"]
fn crash_child() {
    let dir = std::env::var_os(CHILD_ENV)
        .unwrap_or_else(|| panic!("{CHILD_ENV} unset: run only by spawn_child"));
    let dir = std::path::PathBuf::from(dir);
    let (c, _) = open(&dir);
    let mut rng = 0x1234_5678_u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut buf = vec![0u8; 3000];
    for i in 0u64.. {
        let off = next() % (BLOCKS * u64::from(BS) - 3000);
        if next() % 3 == 0 {
            let fill = vec![(i % 251) as u8; 1 + (next() % 2999) as usize];
            c.write(&fill, off, false).unwrap();
        } else {
            c.read(&mut buf, off).unwrap();
        }
        if i % 200 == 0 {
            std::fs::write(dir.join("progress"), i.to_string()).unwrap();
        }
    }
}

/// Reopens the cache in `dir` and checks that everything it serves equals the origin.
fn verify(dir: &std::path::Path, what: &str) {
    let (c, report) = open(dir);
    let img = crate::image(dir);
    let mut blk = vec![0u8; BS as usize];
    let mut served = 0;
    for b in 0..BLOCKS {
        if c.peek_block(BlockIdx(b), &mut blk).unwrap().is_some() {
            served += 1;
            assert_eq!(
                blk,
                img[(b * u64::from(BS)) as usize..][..BS as usize],
                "{what}: stale block {b} served, {report:?}"
            );
        }
    }
    assert_eq!(served, report.verified, "{what}");
    let mut all = vec![0u8; img.len()];
    c.read(&mut all, 0).unwrap();
    assert!(all == img, "{what}: guest read differs from the origin");
}

fn spawn_child(dir: &std::path::Path, failpoint: Option<&str>) -> std::process::Child {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "crash::crash_child", "--ignored", "--nocapture"])
        .env(CHILD_ENV, dir)
        .env_remove("VINFRA_CACHE_FAILPOINT")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(f) = failpoint {
        cmd.env("VINFRA_CACHE_FAILPOINT", f);
    }
    cmd.spawn().unwrap()
}

/// The child aborts at each crash-relevant point in turn (after many passes, so the cache
/// is full and has checkpointed); each time, the reopened cache serves only good blocks.
#[test]
fn a_cache_aborted_at_each_fail_point_serves_no_stale_block() {
    for fp in [
        "write::after_bump:300",
        "write::after_origin:300",
        "write::after_slot:200",
        "install::after_data:300",
        "checkpoint::before_save:5",
        "checkpoint::before_journal_reset:5",
    ] {
        let dir = tempfile::tempdir().unwrap();
        crate::origin(dir.path(), BLOCKS);
        let mut child = spawn_child(dir.path(), Some(fp));
        let deadline = Instant::now() + Duration::from_secs(30);
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break st;
            }
            if Instant::now() > deadline {
                child.kill().unwrap();
                panic!("{fp}: the fail point never fired");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(!status.success(), "{fp}: the child should have aborted");
        verify(dir.path(), fp);
    }
}

#[test]
fn a_cache_killed_mid_work_serves_no_stale_block() {
    let dir = tempfile::tempdir().unwrap();
    crate::origin(dir.path(), BLOCKS);
    let mut child = spawn_child(dir.path(), None);
    // Wait until the child has done a few thousand operations (several checkpoints).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let done: u64 = std::fs::read_to_string(dir.path().join("progress"))
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if done >= 3000 {
            break;
        }
        assert!(Instant::now() < deadline, "child made no progress");
        assert!(child.try_wait().unwrap().is_none(), "child exited early");
        std::thread::yield_now();
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();

    verify(dir.path(), "kill -9");
}
