use std::os::unix::fs::FileExt;

use cache::{BlockIdx, BlockSource, CacheSource};

use crate::{image, open, origin, BS};

const BSU: u64 = BS as u64;

#[test]
fn reads_match_the_origin_and_fill_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let o = origin(dir.path(), 64);
    let (c, _) = open(dir.path(), "c", 16, &o);
    let img = image(dir.path());
    // Unaligned read spanning three blocks.
    let mut buf = vec![0u8; 2 * BS as usize + 100];
    c.read(&mut buf, BSU - 50).unwrap();
    assert_eq!(buf, img[BS as usize - 50..][..buf.len()]);
    let s = c.stats();
    // BS-50 .. 3*BS+50 touches blocks 0, 1, 2 and 3.
    assert_eq!((s.hits, s.misses, s.cached_blocks), (0, 4, 4));
    c.read(&mut buf, BSU - 50).unwrap();
    assert_eq!(c.stats().hits, 4);
    assert_eq!(buf, img[BS as usize - 50..][..buf.len()]);
    assert_eq!(c.stats().bytes_from_origin, 4 * BSU);
}

#[test]
fn out_of_range_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let o = origin(dir.path(), 4);
    let (c, _) = open(dir.path(), "c", 4, &o);
    let mut buf = vec![0u8; 10];
    let e = c.read(&mut buf, 4 * BSU - 5).unwrap_err();
    assert!(e.to_string().contains("outside the disk"), "{e}");
    assert!(c.write(&buf, u64::MAX - 2, false).is_err());
}

#[test]
fn writes_go_through_and_partial_writes_read_modify_write() {
    let dir = tempfile::tempdir().unwrap();
    let o = origin(dir.path(), 32);
    let (c, _) = open(dir.path(), "c", 8, &o);
    let mut buf = vec![0u8; BS as usize];
    c.read(&mut buf, 2 * BSU).unwrap(); // block 2 cached
    let g = c.generation(BlockIdx(2));
    // Partial write spanning cached block 2 and uncached block 3.
    let patch = vec![0xabu8; 300];
    c.write(&patch, 3 * BSU - 100, false).unwrap();
    assert!(c.generation(BlockIdx(2)) > g);
    let mut expect = image(dir.path());
    assert_eq!(
        &expect[3 * BS as usize - 100..][..300],
        &patch[..],
        "write-through to the origin"
    );
    let mut got = vec![0u8; 3 * BS as usize];
    c.read(&mut got, BSU).unwrap();
    expect = image(dir.path());
    assert_eq!(got, expect[BS as usize..4 * BS as usize]);
    // Full-block write to an uncached block is installed (write-allocate).
    let full = vec![0x11u8; BS as usize];
    c.write(&full, 10 * BSU, true).unwrap();
    assert!(c.contains(BlockIdx(10)));
    let hits = c.stats().hits;
    c.read(&mut buf, 10 * BSU).unwrap();
    assert_eq!(buf, full);
    assert_eq!(c.stats().hits, hits + 1);
}

#[test]
fn capacity_is_respected_and_eviction_keeps_hot_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let o = origin(dir.path(), 256);
    let (c, _) = open(dir.path(), "c", 16, &o);
    let mut buf = vec![0u8; 512];
    for round in 0..50u64 {
        for hot in 0..4 {
            c.read(&mut buf, hot * BSU).unwrap();
        }
        c.read(&mut buf, (10 + round * 3 % 200) * BSU).unwrap();
    }
    let s = c.stats();
    assert!(s.cached_blocks <= 16);
    assert!(s.evictions > 0);
    for hot in 0..4 {
        assert!(c.contains(BlockIdx(hot)), "hot block {hot} evicted");
    }
}

#[test]
fn survives_a_crash_and_serves_the_same_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let o = origin(dir.path(), 64);
    let img = image(dir.path());
    {
        let (c, _) = open(dir.path(), "c", 32, &o);
        let mut buf = vec![0u8; BS as usize];
        for b in 0..20 {
            c.read(&mut buf, b * BSU).unwrap();
        }
        c.write(&[7u8; 100], 5 * BSU + 10, false).unwrap();
        // Dropped without a checkpoint: as after kill -9, only data + journal remain.
    }
    let (c, report) = open(dir.path(), "c", 32, &o);
    assert_eq!(report.verified, 20, "{report:?}");
    assert_eq!(report.dropped_checksum + report.dropped_generation, 0);
    assert!(report.journal_records > 0);
    let peer = CacheSource::new(c.clone());
    let mut buf = vec![0u8; BS as usize];
    assert!(peer.read_block(BlockIdx(3), &mut buf).unwrap().is_some());
    assert_eq!(buf, img[3 * BS as usize..4 * BS as usize]);
    assert!(peer.read_block(BlockIdx(40), &mut buf).unwrap().is_none());
    peer.read_block(BlockIdx(5), &mut buf).unwrap().unwrap();
    assert_eq!(&buf[10..110], &[7u8; 100][..]);
    // Heat and pattern survived too (in the open-time checkpoint).
    let snap = c.migration_snapshot();
    assert_eq!(snap.blocks.len(), 20);
}

#[test]
fn a_block_whose_data_no_longer_matches_is_dropped_not_served() {
    let dir = tempfile::tempdir().unwrap();
    let o = origin(dir.path(), 64);
    {
        let (c, _) = open(dir.path(), "c", 32, &o);
        let mut buf = vec![0u8; BS as usize];
        for b in 0..10 {
            c.read(&mut buf, b * BSU).unwrap();
        }
        c.checkpoint().unwrap();
    }
    // Corrupt two slots behind the cache's back (a torn write, bit rot).
    let data = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("c/data"))
        .unwrap();
    data.write_all_at(b"garbage", 0).unwrap();
    data.write_all_at(b"garbage", 3 * BSU + 17).unwrap();
    drop(data);
    let (c, report) = open(dir.path(), "c", 32, &o);
    assert_eq!(report.dropped_checksum, 2, "{report:?}");
    assert_eq!(report.verified, 8);
    // The dropped blocks are refetched from the origin, never served corrupt.
    let img = image(dir.path());
    let mut buf = vec![0u8; 10 * BS as usize];
    c.read(&mut buf, 0).unwrap();
    assert_eq!(buf, img[..10 * BS as usize]);
    assert_eq!(c.stats().misses, 2);
}

#[test]
fn a_write_interrupted_before_the_cache_update_drops_the_stale_copy() {
    let dir = tempfile::tempdir().unwrap();
    let o = origin(dir.path(), 64);
    {
        let (c, _) = open(dir.path(), "c", 32, &o);
        let mut buf = vec![0u8; BS as usize];
        c.read(&mut buf, 4 * BSU).unwrap();
        c.checkpoint().unwrap();
    }
    // Replay what a crash right after "bump generation" and "write origin" leaves: the
    // journal says block 4 is at a newer generation, the slot still holds the old data.
    {
        use cache::meta::{load_checkpoint, Journal, Record};
        let epoch = load_checkpoint(&dir.path().join("c/meta"))
            .unwrap()
            .unwrap()
            .epoch;
        let (mut j, _) = Journal::open(&dir.path().join("c/journal"), epoch).unwrap();
        j.append(&Record::Bump {
            block: BlockIdx(4),
            gen: cache::Generation(1),
        })
        .unwrap();
        cache::BlockOrigin::write_at(&*o, &[9u8; BS as usize], 4 * BSU, false).unwrap();
    }
    let (c, report) = open(dir.path(), "c", 32, &o);
    assert_eq!(report.dropped_generation, 1, "{report:?}");
    assert!(!c.contains(BlockIdx(4)));
    let mut buf = vec![0u8; BS as usize];
    c.read(&mut buf, 4 * BSU).unwrap();
    assert_eq!(buf, vec![9u8; BS as usize]);
}

#[test]
fn a_corrupt_checkpoint_starts_the_cache_empty_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let o = origin(dir.path(), 16);
    {
        let (c, _) = open(dir.path(), "c", 8, &o);
        let mut buf = vec![0u8; 64];
        c.read(&mut buf, 0).unwrap();
    }
    std::fs::write(dir.path().join("c/meta"), b"VCMETA01 not really").unwrap();
    let (c, report) = open(dir.path(), "c", 8, &o);
    let why = report.discarded_checkpoint.unwrap();
    assert!(why.contains("c/meta"), "{why}");
    assert_eq!(c.stats().cached_blocks, 0);
}

#[test]
fn lookahead_follows_the_guest_as_it_reads() {
    let dir = tempfile::tempdir().unwrap();
    let o = origin(dir.path(), 64);
    let (c, _) = open(dir.path(), "c", 32, &o);
    let mut buf = vec![0u8; 512];
    for b in (0..10).chain(0..=5) {
        c.read(&mut buf, b * BSU).unwrap();
    }
    assert_eq!(c.lookahead(3), vec![BlockIdx(6), BlockIdx(7), BlockIdx(8)]);
    for b in 6..=20 {
        c.read(&mut buf, b * BSU).unwrap();
    }
    // Past anything seen before: the scan is extrapolated.
    assert_eq!(c.lookahead(2), vec![BlockIdx(21), BlockIdx(22)]);
}

/// Readers, writers and evictions racing on a tiny cache: a read returns one version of a
/// block, never a mix of an old and a new one (every version fills its block with one byte).
#[test]
fn concurrent_reads_writes_and_evictions_never_return_mixed_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let blocks = 64u64;
    let p = dir.path().join("disk.img");
    let data: Vec<u8> = (0..blocks * BSU).map(|i| (i / BSU) as u8).collect();
    std::fs::write(&p, data).unwrap();
    let bs = cache::BlockSize::new(BS).unwrap();
    let o = std::sync::Arc::new(cache::FileOrigin::open(&p, bs, None).unwrap());
    let (c, _) = open(dir.path(), "c", 8, &o);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let c = &c;
            s.spawn(move || {
                let mut x = t + 1;
                let mut buf = vec![0u8; BS as usize];
                for i in 0..1500u64 {
                    x = x
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    let b = (x >> 33) % blocks;
                    if t == 0 && i % 3 == 0 {
                        c.write(&vec![(i % 200) as u8 + 50; BS as usize], b * BSU, false)
                            .unwrap();
                    } else {
                        c.read(&mut buf, b * BSU).unwrap();
                        assert!(buf.iter().all(|v| *v == buf[0]), "mixed block {b}");
                    }
                }
            });
        }
    });
    assert!(c.stats().evictions > 0);
    // And the cache still agrees with the origin everywhere.
    let img = image(dir.path());
    let mut all = vec![0u8; img.len()];
    c.read(&mut all, 0).unwrap();
    assert!(all == img);
}

#[test]
fn the_checkpointer_persists_heat_learned_from_hits_only() {
    let dir = tempfile::tempdir().unwrap();
    let o = origin(dir.path(), 16);
    let (c, _) = open(dir.path(), "c", 8, &o);
    let mut buf = vec![0u8; 512];
    c.read(&mut buf, 3 * BSU).unwrap();
    c.checkpoint().unwrap();
    assert!(!c.checkpoint_if_changed().unwrap(), "nothing changed");
    for _ in 0..50 {
        c.read(&mut buf, 3 * BSU).unwrap(); // hits: journal nothing
    }
    let ck = c.spawn_checkpointer(std::time::Duration::from_millis(10));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !checkpoint_has_heat(dir.path(), 51.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "no periodic checkpoint"
        );
        std::thread::yield_now();
    }
    ck.stop();
    drop(c);
    let (c, _) = open(dir.path(), "c", 8, &o);
    let heat = c.migration_snapshot().heat;
    assert!(heat.entries[0].1 > 40.0, "{:?}", heat.entries);
}

fn checkpoint_has_heat(dir: &std::path::Path, at_least: f64) -> bool {
    cache::meta::load_checkpoint(&dir.join("c/meta"))
        .ok()
        .flatten()
        .is_some_and(|c| {
            c.heat
                .entries
                .first()
                .is_some_and(|e| e.1 >= at_least * 0.9)
        })
}
