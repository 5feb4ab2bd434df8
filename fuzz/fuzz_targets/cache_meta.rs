//! The block cache's on-disk metadata as `BlockCache::open` reads it after a crash or from
//! another version: the checkpoint file (header, checksum, JSON body), the heat map and
//! access pattern restored from it (then used to plan a fetch), and the journal (records
//! of the checkpoint's epoch up to the first torn one). None may panic.
//!
//! The first byte picks how the rest is used: as raw file bytes, or (to get past the
//! checksums) as a checkpoint body / journal records that the target frames and
//! checksums itself.
#![no_main]

use std::path::Path;

use cache::meta::{parse_checkpoint, replay_journal, META_FORMAT, RECORD_LEN};
use cache::{lookahead, plan_fetch, AccessPattern, BlockIdx, BlockSet, HeatMap, Strategy};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        check_checkpoint(rest);
        let epoch = rest
            .get(8..16)
            .map_or(0, |e| u64::from_le_bytes(e.try_into().unwrap()));
        let _ = replay_journal(rest, epoch);
    } else {
        check_checkpoint(&frame_checkpoint(rest));
        check_journal(rest);
    }
});

/// `body` behind a valid checkpoint header.
fn frame_checkpoint(body: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(24 + body.len());
    f.extend_from_slice(b"VCMETA01");
    f.extend_from_slice(&META_FORMAT.to_le_bytes());
    f.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
    f.extend_from_slice(&(body.len() as u64).to_le_bytes());
    f.extend_from_slice(body);
    f
}

fn check_checkpoint(file: &[u8]) {
    let Ok(body) = parse_checkpoint(file, Path::new("meta")) else {
        return;
    };
    // What open() and a later migration do with a loaded checkpoint.
    let mut heat = HeatMap::from_snapshot(&body.heat);
    let mut pattern = AccessPattern::from_snapshot(&body.pattern);
    let total_blocks = 1 << 16;
    let have: BlockSet = body
        .blocks
        .iter()
        .take(256)
        .map(|m| BlockIdx(m.block))
        .collect();
    for s in [Strategy::Heat, Strategy::Pattern, Strategy::HeatPattern] {
        let plan = plan_fetch(s, &heat, &pattern, &have, pattern.cursor(), total_blocks);
        assert!(plan.iter().all(|b| have.contains(b) && b.0 < total_blocks));
    }
    let _ = lookahead(&pattern, 16, total_blocks);
    // The cache goes on recording accesses on top of the restored state.
    let now = heat.now();
    for (i, m) in body.blocks.iter().take(16).enumerate() {
        heat.record(BlockIdx(m.block), now.saturating_add(i as u64));
        pattern.record(BlockIdx(m.block));
    }
    let _ = heat.snapshot();
    let _ = pattern.snapshot();
    let _ = (
        pattern.seq_continue_prob(pattern.run_len()),
        pattern.accesses_per_transition(),
    );
}

/// `records` as a journal of epoch 7, each 40-byte record given a valid checksum.
fn check_journal(records: &[u8]) {
    let mut j = Vec::with_capacity(16 + records.len());
    j.extend_from_slice(b"VCJRNL01");
    j.extend_from_slice(&7u64.to_le_bytes());
    for chunk in records.chunks(RECORD_LEN) {
        let mut r = chunk.to_vec();
        if r.len() == RECORD_LEN {
            r[4..8].fill(0);
            let sum = crc32fast::hash(&r);
            r[4..8].copy_from_slice(&sum.to_le_bytes());
        }
        j.extend_from_slice(&r);
    }
    let replay = replay_journal(&j, 7);
    // Every record read back re-encodes to the bytes it came from.
    for (i, r) in replay.records.iter().enumerate() {
        let at = 16 + i * RECORD_LEN;
        let enc = r.encode();
        // Fields a kind does not use are not kept; compare the ones it does.
        let kept: &[std::ops::Range<usize>] = match r {
            cache::meta::Record::Map { .. } => &[0..4, 8..36],
            cache::meta::Record::Bump { .. } => &[0..4, 8..16, 24..32],
            cache::meta::Record::Unmap { .. } => &[0..4, 8..16],
        };
        for range in kept {
            assert_eq!(
                enc[range.clone()],
                j[at + range.start..at + range.end],
                "{r:?}"
            );
        }
    }
    assert_eq!(
        replay_journal(&j, 8).records.len(),
        0,
        "another epoch's records replayed"
    );
}
