//! A write that returned `Ok` survives SIGKILL of the writing process.
//!
//! The test re-executes its own test binary, running only [`child_writer`]
//! (ignored in normal runs), which writes keys through every write path and
//! prints `ACK <rev> <key>...` after each write returned. The parent kills it
//! with SIGKILL mid-stream, reopens the file (redb repairs it) and checks every
//! acknowledged key, three times over on the same file.
//!
//! What this proves: nothing is acknowledged before redb committed it (with
//! `Durability::None` this test fails at once). What it cannot prove: that the
//! commit reached the disk, since a killed process leaves the page cache
//! intact; that is `Durability::Immediate`'s fsync, which needs a power cut.

use std::io::{BufRead, BufReader};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use bytes::Bytes;
use store::{Revision, Store, TxnOp};
use store_redb::RedbStore;
use test_utils::ChildGuard;

const PATH_ENV: &str = "VINFRA_REDB_CHILD_PATH";
const START_ENV: &str = "VINFRA_REDB_CHILD_START";

fn value(key: &str) -> Bytes {
    Bytes::from(format!("value of {key}").repeat(20))
}

#[tokio::test]
#[ignore = "helper process of kill_9_loses_no_acknowledged_write"]
async fn child_writer() {
    let Some(path) = std::env::var_os(PATH_ENV) else {
        return;
    };
    let start: u64 = std::env::var(START_ENV).unwrap().parse().unwrap();
    let store = RedbStore::open(Path::new(&path)).unwrap();
    for i in start.. {
        let key = format!("/dur/{i:08}");
        // Rotate through put, cas and a two-key txn.
        let (rev, keys) = match i % 3 {
            0 => (store.put(&key, value(&key)).await.unwrap(), vec![key]),
            1 => (store.cas(&key, None, value(&key)).await.unwrap(), vec![key]),
            _ => {
                let key2 = format!("{key}-b");
                let ops = [&key, &key2]
                    .iter()
                    .map(|k| TxnOp::Put {
                        key: (*k).clone(),
                        value: value(k),
                    })
                    .collect();
                (store.txn(vec![], ops).await.unwrap(), vec![key, key2])
            }
        };
        // stdout is line-buffered: the line leaves the process right here.
        println!("ACK {} {}", rev.0, keys.join(" "));
    }
}

/// Runs one child on `path` from index `start`, kills it after `kill_after`
/// acknowledged writes, and returns every acknowledgement it printed.
fn run_and_kill(path: &Path, start: u64, kill_after: usize) -> Vec<(Revision, String)> {
    let exe = std::env::current_exe().unwrap();
    let child = Command::new(exe)
        .args([
            "--exact",
            "durability::child_writer",
            "--ignored",
            "--nocapture",
        ])
        .args(["--test-threads", "1"])
        .env(PATH_ENV, path)
        .env(START_ENV, start.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard::from(child);
    let stdout = guard.std_mut().unwrap().stdout.take().unwrap();
    let mut acks = Vec::new();
    let mut writes = 0;
    let mut killed = None;
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let Some(rest) = line.strip_prefix("ACK ") else {
            continue; // the test harness's own output
        };
        let mut words = rest.split(' ');
        let rev = Revision(words.next().unwrap().parse().unwrap());
        acks.extend(words.map(|k| (rev, k.to_owned())));
        writes += 1;
        if writes == kill_after {
            // SIGKILL mid-stream; lines already in the pipe are still read.
            killed = guard.kill();
        }
    }
    let status = killed.expect("child exited before it was killed");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
    acks
}

#[tokio::test(flavor = "multi_thread")]
async fn kill_9_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("state.redb");
    let mut acked: Vec<(Revision, String)> = Vec::new();
    let mut start = 0;
    for kill_after in [40, 90, 25] {
        let new = tokio::task::spawn_blocking({
            let path = path.clone();
            move || run_and_kill(&path, start, kill_after)
        })
        .await
        .unwrap();
        assert!(new.len() >= kill_after, "acks of round starting at {start}");
        eprintln!(
            "round from {start}: {} keys acknowledged before SIGKILL",
            new.len()
        );
        // Revisions keep growing across crashes.
        let last_before = acked.last().map(|(r, _)| *r);
        assert!(
            last_before < Some(new[0].0),
            "{last_before:?} then {:?}",
            new[0].0
        );
        acked.extend(new);
        start += 1000;

        let store = RedbStore::open(&path).unwrap();
        for (rev, key) in &acked {
            let kv = store
                .get(key)
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("acknowledged {key} lost"));
            assert_eq!(kv.mod_revision, *rev, "{key}");
            assert_eq!(kv.value, value(key), "{key}");
        }
        let after = store.put("/after", Bytes::new()).await.unwrap();
        assert!(after > acked.last().unwrap().0);
        // Closes the file for the next child.
        drop(store);
    }
}
