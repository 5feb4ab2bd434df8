//! kill -9 of the writing process (the server's role: it runs the same writer task)
//! in the middle of appends, over and over, on redb and on etcd: no acknowledged
//! entry is lost, no gap appears, and every checkpoint a client was given is
//! consistent with the final log.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use model::SplitMix64;
use store::Store;
use translog::hash::hash_from_hex;
use translog::verify::{audit, verify_consistency, TrustedKeys, VerifiedCheckpoint};
use translog::{LogConfig, Signer, TransLog};

const PREFIX: &str = "/vinfra/translog/c/";
const ORIGIN: &str = "vinfra.test/c";
/// `redb:<path>` or `etcd:<endpoint>`: the store the child appends to.
const STORE_ENV: &str = "TRANSLOG_CRASH_STORE";
const KEY_ENV: &str = "TRANSLOG_CRASH_KEY";
/// How many times the writer is killed (each run is a process start, a redb
/// recovery or an etcd connection, and a log load: about 50 ms here).
const KILLS: u64 = 100;

/// Opens the store a `STORE_ENV` value names.
async fn open_store(spec: &str) -> Arc<dyn Store> {
    match spec.split_once(':') {
        Some(("redb", path)) => Arc::new(store_redb::RedbStore::open(Path::new(path)).unwrap()),
        Some(("etcd", endpoint)) => Arc::new(
            store_etcd::EtcdStore::connect(&[endpoint.to_owned()], None)
                .await
                .unwrap(),
        ),
        _ => panic!("{STORE_ENV}={spec}: neither redb:<path> nor etcd:<endpoint>"),
    }
}

/// The writer process, run only when re-executed by a crash test (with the store in
/// the environment): appends from 16 concurrent tasks forever and prints each
/// acknowledgement with its checkpoint.
#[tokio::test]
#[ignore = "helper process of the crash tests in this module"]
async fn crash_child_appender() {
    let (Ok(spec), Ok(key)) = (std::env::var(STORE_ENV), std::env::var(KEY_ENV)) else {
        panic!("run by the crash tests, with {STORE_ENV} and {KEY_ENV} set");
    };
    let store = open_store(&spec).await;
    let signer = Signer::load_or_create(Path::new(&key)).unwrap();
    let log = TransLog::open(store, LogConfig::new(PREFIX, ORIGIN), signer)
        .await
        .unwrap();
    let run = std::process::id();
    let mut tasks = Vec::new();
    for w in 0..16 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            for seq in 0u64.. {
                let body = format!("p{run}-w{w}-{seq}");
                let a = log.append(body.clone().into_bytes()).await.unwrap();
                let mut out = std::io::stdout().lock();
                writeln!(
                    out,
                    "ack {} {body} {} {}",
                    a.index,
                    a.checkpoint.size,
                    translog::hash::to_hex(&a.checkpoint.root)
                )
                .unwrap();
                out.flush().unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

#[test]
fn kill_9_mid_append_loses_no_acknowledged_entry() {
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("redb:{}", dir.path().join("log.redb").display());
    kill_9_rounds(&spec, &dir.path().join("ledger.key"));
}

/// The same on a one-member etcd: a writer killed between sending a transaction and
/// reading etcd's answer leaves an outcome it never learnt; the next writer reads it.
#[test]
fn kill_9_mid_append_on_etcd_loses_no_acknowledged_entry() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let etcd = rt
        .block_on(test_utils::EtcdFixture::spawn())
        .expect("start etcd");
    kill_9_rounds(
        &format!("etcd:{}", etcd.endpoint()),
        &dir.path().join("ledger.key"),
    );
}

/// `KILLS` rounds of: start a writer on `spec`, let it acknowledge 1–60 appends, kill
/// it; then audit what the store holds against every acknowledgement and checkpoint.
fn kill_9_rounds(spec: &str, key: &Path) {
    let exe = std::env::current_exe().unwrap();
    let mut rng = SplitMix64::new(0xdead);
    let mut acked: Vec<(u64, String)> = Vec::new();
    let mut checkpoints: Vec<(u64, translog::Hash)> = Vec::new();
    for _ in 0..KILLS {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash::crash_child_appender",
                "--ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(STORE_ENV, spec)
            .env(KEY_ENV, key)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let kill_after = 1 + rng.below(60);
        let mut seen = 0;
        let mut record = |line: &str| {
            let f: Vec<&str> = line.split(' ').collect();
            if f.len() == 5 && f[0] == "ack" {
                acked.push((f[1].parse().unwrap(), f[2].to_owned()));
                checkpoints.push((f[3].parse().unwrap(), hash_from_hex(f[4]).unwrap()));
                true
            } else {
                false
            }
        };
        for line in lines.by_ref() {
            if record(&line.unwrap()) {
                seen += 1;
                if seen >= kill_after {
                    break;
                }
            }
        }
        child.kill().unwrap(); // SIGKILL
                               // Acknowledgements already written before the kill count too.
        for line in lines {
            let Ok(line) = line else { break };
            record(&line);
        }
        child.wait().unwrap();
    }
    assert!(acked.len() as u64 >= KILLS);

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = open_store(spec).await;
        let signer = Signer::load_or_create(key).unwrap();
        let mut keys = TrustedKeys::new();
        keys.add(signer.public_key());
        let log = TransLog::open(store, LogConfig::new(PREFIX, ORIGIN), signer)
            .await
            .unwrap();
        let raw = log.raw().await.unwrap();
        let (last_size, last_root) = *checkpoints.iter().max_by_key(|(s, _)| *s).unwrap();
        let witness = VerifiedCheckpoint {
            origin: ORIGIN.into(),
            size: last_size,
            root: last_root,
            key_id: String::new(),
            prev: 0,
        };
        // No gap, every signature and every published checkpoint checks out, and
        // the log still contains the largest checkpoint a client was given.
        let audited = audit(PREFIX, ORIGIN, &keys, &raw, Some(&witness)).unwrap();
        for (index, body) in &acked {
            assert_eq!(
                audited.entries.get(*index as usize).map(Vec::as_slice),
                Some(body.as_bytes()),
                "acknowledged entry {index} lost or changed"
            );
        }
        let head = audited.head;
        for (size, root) in &checkpoints {
            let proof = log.consistency_proof(*size, head.size).await.unwrap();
            verify_consistency(*size, head.size, root, &head.root, &proof)
                .unwrap_or_else(|e| panic!("checkpoint at {size} inconsistent: {e}"));
        }
    });
}
