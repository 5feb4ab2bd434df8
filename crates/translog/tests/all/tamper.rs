//! Tampering with a log's keys in the store, and a lying server serving a forked
//! tree: every random mutation is caught, and the untouched log raises no alarm.

use std::sync::Arc;

use model::SplitMix64;
use store::testing::MemStore;
use store::Store;
use translog::hash::leaf_hash;
use translog::verify::{audit, verify_consistency, verify_inclusion, TrustedKeys};
use translog::{LogConfig, Signer, TransLog};

const PREFIX: &str = "/vinfra/translog/t/";
const ORIGIN: &str = "vinfra.test/t";

type Raw = Vec<(String, Vec<u8>)>;

/// A log of `n` entries, appended in small concurrent batches; `fork` replaces the
/// body of entry `fork` (a malicious writer rewriting history with the real key).
async fn build(
    pkcs8: &[u8],
    n: usize,
    fork: Option<usize>,
    snapshot_at: usize,
) -> (Raw, Raw, TransLog) {
    let store: Arc<dyn Store> = Arc::new(MemStore::new());
    let log = TransLog::open(
        store,
        LogConfig::new(PREFIX, ORIGIN),
        Signer::from_pkcs8(pkcs8).unwrap(),
    )
    .await
    .unwrap();
    let mut old = Vec::new();
    let mut i = 0;
    let mut rng = SplitMix64::new(n as u64);
    while i < n {
        let batch = (1 + rng.below(4) as usize).min(n - i);
        let futs: Vec<_> = (i..i + batch)
            .map(|k| {
                let body = if Some(k) == fork {
                    format!("{{\"entry\":{k},\"forked\":true}}")
                } else {
                    format!("{{\"entry\":{k}}}")
                };
                let log = log.clone();
                async move { log.append(body.into_bytes()).await.unwrap() }
            })
            .collect();
        for f in futs {
            f.await;
        }
        i += batch;
        if old.is_empty() && i >= snapshot_at {
            old = log.raw().await.unwrap();
        }
    }
    (log.raw().await.unwrap(), old, log)
}

fn mutate(rng: &mut SplitMix64, raw: &Raw, old: &Raw, forks: &[Raw]) -> (Raw, &'static str) {
    let mut r = raw.clone();
    // Key announcements are discovery only (trust comes from the verifier's keys).
    let ledger: Vec<usize> = (0..r.len())
        .filter(|&i| !r[i].0.contains("/keys/"))
        .collect();
    let pick = |rng: &mut SplitMix64| ledger[rng.below(ledger.len() as u64) as usize];
    let entries: Vec<usize> = (0..r.len())
        .filter(|&i| r[i].0.contains("/entries/"))
        .collect();
    let what = match rng.below(7) {
        0 => {
            let i = pick(rng);
            let v = &mut r[i].1;
            let bit = rng.below(v.len() as u64 * 8);
            v[(bit / 8) as usize] ^= 1 << (bit % 8);
            "flip"
        }
        1 => {
            let i = pick(rng);
            r.remove(i);
            "drop"
        }
        2 if entries.len() >= 2 => {
            let a = entries[rng.below(entries.len() as u64) as usize];
            let mut b = a;
            while b == a {
                b = entries[rng.below(entries.len() as u64) as usize];
            }
            let va = r[a].1.clone();
            r[a].1 = r[b].1.clone();
            r[b].1 = va;
            "reorder"
        }
        3 => return (old.clone(), "rollback"),
        4 => {
            // Roll back only the head: put an older published checkpoint there.
            let head = r.iter().position(|(k, _)| k.ends_with("/head"));
            let older: Vec<usize> = (0..r.len())
                .filter(|&i| {
                    r[i].0.contains("/checkpoints/") && Some(&r[i].1) != head.map(|h| &r[h].1)
                })
                .collect();
            let (Some(head), false) = (head, older.is_empty()) else {
                return mutate(rng, &r, old, forks);
            };
            r[head].1 = r[older[rng.below(older.len() as u64) as usize]].1.clone();
            "head rollback"
        }
        5 if !entries.is_empty() => {
            // A stray entry past the head.
            let last = entries.last().copied().unwrap();
            let n = entries.len();
            r.push((format!("{PREFIX}entries/{n:020}"), r[last].1.clone()));
            r.sort();
            "stray"
        }
        _ => {
            return (
                forks[rng.below(forks.len() as u64) as usize].clone(),
                "fork",
            )
        }
    };
    (r, what)
}

#[tokio::test]
async fn random_mutations_of_the_stored_log_are_all_detected() {
    let (signer, pkcs8) = Signer::generate().unwrap();
    let mut keys = TrustedKeys::new();
    keys.add(signer.public_key());
    let n = 12;
    let (raw, old, _log) = build(&pkcs8, n, None, 5).await;
    let mut forks = Vec::new();
    for f in [0, 5, n - 1] {
        forks.push(build(&pkcs8, n, Some(f), n).await.0);
    }
    // No false alarm on the untouched log; the witness is what it verified.
    let witness = audit(PREFIX, ORIGIN, &keys, &raw, None).unwrap().head;
    assert_eq!(witness.size, n as u64);
    audit(PREFIX, ORIGIN, &keys, &raw, Some(&witness)).unwrap();
    // Forks and the old snapshot are valid logs on their own: only the witness
    // tells them apart.
    audit(PREFIX, ORIGIN, &keys, &forks[0], None).unwrap();
    audit(PREFIX, ORIGIN, &keys, &old, None).unwrap();

    let mut rng = SplitMix64::new(0x5eed);
    let mut kinds = std::collections::BTreeMap::new();
    for trial in 0..10_000 {
        let (mut m, mut what) = mutate(&mut rng, &raw, &old, &forks);
        // Up to two more mutations on top, so combinations are covered too.
        for _ in 0..rng.below(3) {
            let (m2, w2) = mutate(&mut rng, &m, &old, &forks);
            (m, what) = (m2, w2);
        }
        if m == raw {
            continue; // two mutations cancelled out (a bit flipped back)
        }
        *kinds.entry(what).or_insert(0) += 1;
        let r = audit(PREFIX, ORIGIN, &keys, &m, Some(&witness));
        assert!(r.is_err(), "trial {trial}: {what} went undetected");
    }
    assert!(kinds.len() >= 7, "{kinds:?}");
    // And the original is still fine.
    audit(PREFIX, ORIGIN, &keys, &raw, Some(&witness)).unwrap();
}

/// What a log server answers a client that holds an older checkpoint.
struct Answer {
    size: u64,
    root: translog::Hash,
    consistency: Vec<translog::Hash>,
    /// Entry `index`'s stored bytes and its inclusion proof at `size`.
    index: u64,
    entry: Vec<u8>,
    inclusion: Vec<translog::Hash>,
}

async fn answer(log: &TransLog, from: u64, index: u64) -> Answer {
    let head = log.head().await.unwrap();
    Answer {
        size: head.size,
        root: head.root,
        consistency: log.consistency_proof(from, head.size).await.unwrap(),
        index,
        entry: log.entry(index).await.unwrap().unwrap().to_vec(),
        inclusion: log.inclusion_proof(index, head.size).await.unwrap(),
    }
}

/// The client's check of a server's answer against its witnessed (size, root).
fn client_accepts(witness: (u64, translog::Hash), a: &Answer) -> bool {
    verify_consistency(witness.0, a.size, &witness.1, &a.root, &a.consistency).is_ok()
        && verify_inclusion(a.index, a.size, &leaf_hash(&a.entry), &a.inclusion, &a.root).is_ok()
}

#[tokio::test]
async fn a_lying_server_serving_a_forked_tree_is_caught() {
    let (_signer, pkcs8) = Signer::generate().unwrap();
    let n = 40;
    let (_, _, honest) = build(&pkcs8, n, None, n).await;
    let mut liars = Vec::new();
    for f in [0, 3, 17, 39] {
        liars.push((f as u64, build(&pkcs8, n, Some(f), n).await.2));
    }
    let mut rng = SplitMix64::new(7);
    for _ in 0..300 {
        // The client witnessed the honest log at size m.
        let m = 1 + rng.below(n as u64);
        let witness = (m, root_at(&honest, m).await);
        let index = rng.below(n as u64);
        assert!(
            client_accepts(witness, &answer(&honest, m, index).await),
            "honest answer refused"
        );
        // A liar whose fork lies inside what the client witnessed is caught by the
        // consistency proof; one whose fork lies beyond is caught on the forked
        // entry by its inclusion proof only if the client holds that entry's
        // honest bytes — so ask about the forked entry with the honest bytes.
        for (f, liar) in &liars {
            let mut a = answer(liar, m, index).await;
            if *f >= m {
                a.index = *f;
                a.entry = honest.entry(*f).await.unwrap().unwrap().to_vec();
                a.inclusion = liar.inclusion_proof(*f, a.size).await.unwrap();
            }
            assert!(
                !client_accepts(witness, &a),
                "liar forked at {f} accepted at m={m}"
            );
        }
        // A server rolling the client back, or bending a proof, is caught too.
        let mut a = answer(&honest, m, index).await;
        match rng.below(3) {
            0 if m > 1 => {
                a.size = m - 1;
                a.root = root_at(&honest, m - 1).await;
                a.consistency = vec![];
            }
            1 if !a.consistency.is_empty() => {
                let i = rng.below(a.consistency.len() as u64) as usize;
                a.consistency[i][rng.below(32) as usize] ^= 1 << rng.below(8);
            }
            _ => {
                let i = rng.below(a.inclusion.len() as u64) as usize;
                a.inclusion[i][rng.below(32) as usize] ^= 1 << rng.below(8);
            }
        }
        assert!(
            !client_accepts(witness, &a),
            "bent answer accepted at m={m}"
        );
    }
}

/// The honest root at `size`, recomputed by the verifier's own fold of the
/// stored entries.
async fn root_at(log: &TransLog, size: u64) -> translog::Hash {
    let mut f = translog::verify::RootFolder::default();
    for i in 0..size {
        f.push(leaf_hash(&log.entry(i).await.unwrap().unwrap()));
    }
    f.root()
}
