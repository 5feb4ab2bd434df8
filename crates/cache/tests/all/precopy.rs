//! Cache pre-copy: the destination copies from the source's cache while the source guest
//! still writes; after the source's dirty list is applied, nothing stale is ever served.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use cache::{prepare_destination, BlockIdx, CacheSource, Rebuild, Strategy};
use model::SplitMix64;

use crate::{image, open, origin, BS};

const BSU: u64 = BS as u64;

fn block_of(img: &[u8], b: u64) -> &[u8] {
    &img[(b * BSU) as usize..((b + 1) * BSU) as usize]
}

#[test]
fn precopy_never_serves_a_block_the_source_rewrote_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let o = origin(dir.path(), 96);
    let (src, _) = open(dir.path(), "src", 64, &o);
    let mut buf = vec![0u8; BS as usize];
    for round in 0..2u64 {
        for b in 0..56 {
            src.read(&mut buf, ((b * 5 + round) % 60) * BSU).unwrap();
        }
    }
    // The snapshot, and from then on the source's dirty list.
    let snap = src.migration_snapshot();
    src.track_writes();
    let (dst, _) = open(dir.path(), "dst", 64, &o);
    dst.begin_precopy().unwrap();
    assert!(dst.precopy_pending());
    let plan = prepare_destination(
        &dst,
        &snap,
        Arc::new(CacheSource::new(src.clone())),
        Strategy::HeatPattern,
    );
    assert!(!plan.blocks.is_empty());

    // The source guest keeps writing (whole blocks and pieces of blocks) while the
    // destination copies: the memory migration.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (src, stop) = (src.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng = SplitMix64::new(7);
            let mut n = 0u32;
            while !stop.load(Ordering::Relaxed) || n < 200 {
                // The guest rewrites the first half of what was cached; the rest stays clean.
                let b = rng.below(30);
                let fill = [(n % 250) as u8 + 1; BS as usize];
                if n.is_multiple_of(3) {
                    let at = rng.below(BSU - 100);
                    src.write(&fill[..100], b * BSU + at, false).unwrap();
                } else {
                    src.write(&fill, b * BSU, false).unwrap();
                }
                n += 1;
            }
            n
        })
    };
    let progress = Rebuild::start(dst.clone(), plan).join();
    stop.store(true, Ordering::Relaxed);
    let writes = writer.join().unwrap();
    assert!(writes >= 200);
    assert!(progress.installed > 0, "{progress:?}");

    // Switch-over happened (the source guest stopped); before the dirty list arrives,
    // every read is already the origin's current data.
    let img = image(dir.path());
    for b in 0..60 {
        dst.read(&mut buf, b * BSU).unwrap();
        assert_eq!(buf, block_of(&img, b), "block {b} before the dirty list");
    }
    let dirty = src.take_dirty().expect("tracking was on");
    let dirty_blocks: u64 = dirty.iter().map(|r| r[1]).sum();
    assert!(dirty_blocks > 10, "{dirty:?}");
    assert!(
        dirty.windows(2).all(|w| w[0][0] + w[0][1] < w[1][0]),
        "ranges sorted, disjoint, merged: {dirty:?}"
    );
    let dropped = dst.apply_dirty(&dirty).unwrap();
    assert!(!dst.precopy_pending());
    assert!(dropped > 0, "some copied block was rewritten on the source");

    // After: every block equals the origin's, and the copied blocks nobody wrote are
    // hits (the pre-copy's gain survives).
    let misses = dst.stats().misses;
    let mut clean_hits = 0;
    for b in 0..60u64 {
        let is_dirty = dirty.iter().any(|r| (r[0]..r[0] + r[1]).contains(&b));
        let cached = dst.contains(BlockIdx(b));
        assert!(!(is_dirty && cached), "dirty block {b} still cached");
        let before = dst.stats().misses;
        dst.read(&mut buf, b * BSU).unwrap();
        assert_eq!(buf, block_of(&img, b), "block {b} after the dirty list");
        if cached && dst.stats().misses == before {
            clean_hits += 1;
        }
    }
    assert!(clean_hits > 0, "no copied block was kept ({misses} misses)");
}

#[test]
fn a_partial_write_never_merges_into_a_provisional_copy() {
    let dir = tempfile::tempdir().unwrap();
    let o = origin(dir.path(), 16);
    let (src, _) = open(dir.path(), "src", 8, &o);
    let mut buf = vec![0u8; BS as usize];
    src.read(&mut buf, 2 * BSU).unwrap();
    let snap = src.migration_snapshot();
    src.track_writes();
    let (dst, _) = open(dir.path(), "dst", 8, &o);
    dst.begin_precopy().unwrap();
    let _ = prepare_destination(
        &dst,
        &snap,
        Arc::new(CacheSource::new(src.clone())),
        Strategy::Heat,
    );
    assert!(dst
        .prefetch(BlockIdx(2))
        .unwrap()
        .is_some_and(|(_, installed)| installed));
    // The source rewrites the block after it was copied; then (on the destination) the
    // guest writes 100 bytes into it before the dirty list arrived.
    src.write(&[0x11u8; BS as usize], 2 * BSU, false).unwrap();
    dst.write(&[0xeeu8; 100], 2 * BSU + 5, false).unwrap();
    dst.read(&mut buf, 2 * BSU).unwrap();
    let img = image(dir.path());
    assert_eq!(buf, block_of(&img, 2));
    assert_eq!(buf[0], 0x11);
    assert_eq!(&buf[5..105], &[0xeeu8; 100][..]);
}

#[test]
fn an_interrupted_precopy_trusts_no_block_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let o = origin(dir.path(), 16);
    let (src, _) = open(dir.path(), "src", 8, &o);
    let mut buf = vec![0u8; BS as usize];
    for b in 0..4 {
        src.read(&mut buf, b * BSU).unwrap();
    }
    let snap = src.migration_snapshot();
    {
        let (dst, _) = open(dir.path(), "dst", 8, &o);
        dst.begin_precopy().unwrap();
        let plan = prepare_destination(
            &dst,
            &snap,
            Arc::new(CacheSource::new(src.clone())),
            Strategy::Heat,
        );
        assert_eq!(Rebuild::start(dst.clone(), plan).join().installed, 4);
        dst.checkpoint().unwrap();
        // Crash: dropped without the dirty list.
    }
    let (dst, report) = open(dir.path(), "dst", 8, &o);
    assert_eq!(
        (report.verified, report.dropped_precopy),
        (0, 4),
        "{report:?}"
    );
    assert!(!dst.precopy_pending());
    drop(dst);
    // The marker is gone with the blocks: a later open has nothing to drop.
    let (_, report) = open(dir.path(), "dst", 8, &o);
    assert_eq!(report.dropped_precopy, 0);
}

#[test]
fn without_tracking_there_is_no_dirty_list() {
    let dir = tempfile::tempdir().unwrap();
    let o = origin(dir.path(), 16);
    let (src, _) = open(dir.path(), "src", 8, &o);
    assert_eq!(src.take_dirty(), None);
    src.track_writes();
    src.write(&[1u8; 10], 3 * BSU + 4090, false).unwrap(); // blocks 3 and 4
    src.write(&[1u8; 10], 9 * BSU, false).unwrap();
    assert_eq!(src.take_dirty(), Some(vec![[3, 2], [9, 1]]));
    assert_eq!(src.take_dirty(), None, "taking it ends it");
}

#[test]
fn attaching_the_peer_again_keeps_what_was_written_here_away_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let o = origin(dir.path(), 16);
    let (src, _) = open(dir.path(), "src", 8, &o);
    let mut buf = vec![0u8; BS as usize];
    src.read(&mut buf, 5 * BSU).unwrap();
    let snap = src.migration_snapshot();
    let (dst, _) = open(dir.path(), "dst", 1, &o);
    let peer = || Arc::new(CacheSource::new(src.clone()));
    let _ = prepare_destination(&dst, &snap, peer(), Strategy::Heat);
    // The destination's guest writes block 5 partly (write-around: not cached here);
    // the source's cache still holds the old block 5.
    dst.write(&[0x77u8; 10], 5 * BSU, false).unwrap();
    // A re-plan attaches the same source again (as pre-copy does at switch-over).
    let snap2 = src.migration_snapshot();
    let _ = prepare_destination(&dst, &snap2, peer(), Strategy::Heat);
    dst.read(&mut buf, 5 * BSU).unwrap();
    assert_eq!(
        &buf[..10],
        &[0x77u8; 10][..],
        "read the source's older copy"
    );
    assert_eq!(buf, block_of(&image(dir.path()), 5));
}
